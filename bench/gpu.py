"""One short check of the CUDA path on a machine with an NVIDIA GPU, CuPy and (optionally)
PyTorch; prints a table last.

    PYTHONPATH=. python bench/gpu.py            # about 5 minutes on an H100

1. every test on device="cuda" (a small hypothesis profile), and the fused CUDA kernels against
   the array code they replace (tests/test_cuda_kernels.py);
2. the toolkit on cuda: a short pretraining run with dropout, interrupted and resumed (the losses
   must equal the uninterrupted run's), generation with the KV cache, the errors for token ids
   out of range, and NumPy operands given to ops on the GPU;
3. bench/train_step.py on GPT-2 124M (batch 8, context 1024), next to PyTorch eager with SDPA,
   at float32, with TF32 matrix products (ours and PyTorch's) and mixed precision (ours float16 with
   loss scaling, PyTorch bfloat16 autocast), PyTorch beside our default (the fused CUDA
   kernels on), our array code (TINYGRAD_LLM_CUDA_KERNELS=0) and flash attention alone, with
   per-op profiles;
4. bench/generate.py (tokens/s with and without the KV cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str]] = []  # (check, result, seconds)


def record(name: str, ok: bool | None, detail: str, seconds: float) -> None:
    status = "skipped" if ok is None else ("ok" if ok else "FAILED")
    ROWS.append((name, f"{status}: {detail}", f"{seconds:.0f}"))
    print(f"== {name}: {status} ({detail}, {seconds:.0f} s)", flush=True)


def run(name: str, command: list[str], timeout: float, parse=None, env=None) -> str:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "TINYGRAD_LLM_PROFILE": "quick", **(env or {})}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        output = done.stdout + done.stderr
        print(output[-4000:], flush=True)
        detail = parse(output) if parse else output.strip().splitlines()[-1][:120]
        record(name, done.returncode == 0, detail, time.perf_counter() - start)
        return output
    except subprocess.TimeoutExpired:
        record(name, False, f"timed out after {timeout:.0f} s", time.perf_counter() - start)
        return ""


def value(output: str, key: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(key + "=")]
    return lines[-1].split("=", 1)[1].split()[0] if lines else "?"


def toolkit_on_cuda() -> None:
    """Training with dropout, exact resume, generation and the input checks, on the GPU."""
    import numpy as np

    from tinygrad_llm import Tensor, backend
    from tinygrad_llm import functional as F
    from tinygrad_llm.checkpoint import load_checkpoint
    from tinygrad_llm.generate import generate
    from tinygrad_llm.models.gpt import GPT, GPTConfig
    from tinygrad_llm.tokenizer import CharTokenizer
    from tinygrad_llm.trainer import LanguageModelingTask, PretrainConfig, Trainer, read_metrics

    text = "to be or not to be, that is the question. " * 200
    tokenizer = CharTokenizer.from_text(text)
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=2,
                             n_head=2, n_embd=32, dropout=0.1)

    def trainer(out):
        backend.manual_seed(0)
        config = PretrainConfig(max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2,
                                eval_interval=4, eval_batches=2, sample_tokens=8, seed=0)
        task = LanguageModelingTask(tokenizer, tokens[:6000], tokens[6000:], 32, config)
        return Trainer(GPT(model_config).to("cuda"), task, config, out, show_progress=False,
                       log=lambda line: None)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()

        def losses(folder):
            return [(r["step"], r["train_loss"], r["val_loss"])
                    for r in read_metrics(Path(tmp, folder, "metrics.jsonl"))]

        trainer(Path(tmp, "straight")).train()
        trainer(Path(tmp, "again")).train()
        split = trainer(Path(tmp, "split"))
        split.train(until_step=6)
        resumed = trainer(Path(tmp, "split"))
        resumed.resume(load_checkpoint(Path(tmp, "split", "checkpoint")))
        resumed.train()
        straight, again, continued = losses("straight"), losses("again"), losses("split")
        gap = lambda a, b: max(abs(x - y) for r, q in zip(a, b) for x, y in zip(r, q))  # noqa
        learned = straight[-1][2] < straight[0][2]
        record("cuda: train with dropout, resume exactly", straight == continued and learned,
               f"val loss {straight[0][2]:.3f} -> {straight[-1][2]:.3f}; largest difference: "
               f"two straight runs {gap(straight, again):.2e}, straight vs resumed "
               f"{gap(straight, continued):.2e}", time.perf_counter() - start)

        start = time.perf_counter()
        model = resumed.model
        cpu = GPT(model_config)
        cpu.load_state_dict(model.state_dict())
        prompt = [tokenizer.encode("to be")]
        on_gpu = generate(model, prompt, 20, temperature=0)
        on_cpu = generate(cpu, prompt, 20, temperature=0)
        record("cuda: greedy generation equals the CPU's", on_gpu == on_cpu,
               repr(tokenizer.decode(on_gpu[0]))[:40], time.perf_counter() - start)

    start = time.perf_counter()
    problems = []
    model = GPT(model_config).to("cuda")
    for bad in (np.array([[0, tokenizer.vocab_size]]), np.array([[-1, 0]])):
        try:
            model(bad)
            problems.append(f"ids {bad.tolist()} accepted")
        except ValueError:
            pass
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), device="cuda")
    mask = np.array([[True, False, True], [False, True, False]])
    try:
        checks = {
            "where": F.where(mask, x, 0.0).numpy(),
            "masked_fill": F.masked_fill(x, mask, -1.0).numpy(),
            "compare": (x > np.ones((2, 3), np.float32)).numpy(),
        }
        reference = np.arange(6, dtype=np.float32).reshape(2, 3)
        if not np.array_equal(checks["where"], np.where(mask, reference, 0)):
            problems.append("where differs")
        model.load_state_dict(GPT(model_config).state_dict())  # NumPy arrays into a GPU model
    except Exception as error:  # noqa: BLE001 - report whatever broke
        problems.append(f"{type(error).__name__}: {error}"[:100])
    record("cuda: bad ids refused, NumPy operands accepted", not problems,
           "; ".join(problems) or "all four", time.perf_counter() - start)


def attention_timing() -> None:
    """One causal attention forward and backward at GPT-2 124M's shape, B=8, H=12, T=1024,
    D=64: the array code, cuBLAS products around the fused softmax kernels, and the flash
    kernels (time, and the memory pool's growth while it ran)."""
    import cupy
    import numpy as np

    from tinygrad_llm import Tensor
    from tinygrad_llm import functional as F

    rng = np.random.default_rng(0)
    q, k, v, g = (cupy.asarray(rng.standard_normal((8, 12, 1024, 64)), dtype=np.float32)
                  for _ in range(4))

    def once():
        tensors = [Tensor(a, requires_grad=True, device="cuda") for a in (q, k, v)]
        y = F.scaled_dot_product_attention(*tensors, causal=True)
        y.backward(g)
        return [y.data] + [t.grad for t in tensors]

    pool = cupy.get_default_memory_pool()
    results = {}
    start = time.perf_counter()
    for label, kernels, flash in (("array code", "0", "0"), ("fused softmax", "1", "0"),
                                  ("flash", "1", "1")):
        os.environ.update(TINYGRAD_LLM_CUDA_KERNELS=kernels, TINYGRAD_LLM_FLASH_ATTENTION=flash)
        once()
        cupy.cuda.Device().synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        begin = time.perf_counter()
        for _ in range(5):
            arrays = once()
        cupy.cuda.Device().synchronize()
        results[label] = ((time.perf_counter() - begin) / 5, pool.total_bytes() - before, arrays)
    for name in ("TINYGRAD_LLM_CUDA_KERNELS", "TINYGRAD_LLM_FLASH_ATTENTION"):
        os.environ.pop(name)
    reference = results["array code"][2]
    error = max(float(abs(a - b).max()) for label in ("fused softmax", "flash")
                for a, b in zip(reference, results[label][2], strict=True))
    record("attention fwd+bwd, B=8 H=12 T=1024 D=64", error < 1e-3,
           ", ".join(f"{label} {1000 * seconds:.2f} ms ({memory / 2**20:.0f} MiB)"
                     for label, (seconds, memory, _) in results.items())
           + f"; largest difference {error:.1e}", time.perf_counter() - start)


def attention_parts() -> None:
    """Where the cuBLAS + fused-softmax attention spends its time, piece by piece, at B=8, H=12,
    T=1024, D=64 (each piece synchronised and timed alone, the mean of 5)."""
    import cupy
    import numpy as np

    from tinygrad_llm import cuda_kernels, fused
    from tinygrad_llm.fused import dot_last

    rng = np.random.default_rng(0)
    q, k, v, g, out = (cupy.asarray(rng.standard_normal((8, 12, 1024, 64)), dtype=np.float32)
                       for _ in range(5))
    p = cupy.empty((8, 12, 1024, 1024), np.float32)
    small = cupy.empty_like(q)
    pieces = {
        "S = q k^T": lambda: cupy.matmul(q, k.swapaxes(-1, -2), out=p),
        "causal softmax kernel": lambda: cuda_kernels.causal_softmax(p),
        "out = P v": lambda: cupy.matmul(p, v, out=small),
        "dv = P^T g": lambda: cupy.matmul(p.swapaxes(-1, -2), g, out=small),
        "dv = (g^T P)^T (what fused.py runs)": lambda: fused._matmul_transposed_into(p, g, small),
        "dP = g v^T (new array)": lambda: g @ v.swapaxes(-1, -2),
        "delta, einsum (dot_last)": lambda: dot_last(g, out),
        "delta, (g * out).sum": lambda: (g * out).sum(axis=-1, keepdims=True),
        "softmax backward kernel": lambda: cuda_kernels.softmax_backward(
            p, p, (g * out).sum(axis=-1, keepdims=True)),
        "dq = dS k": lambda: cupy.matmul(p, k, out=small),
        "dk = dS^T q": lambda: cupy.matmul(p.swapaxes(-1, -2), q, out=small),
        "dk = (q^T dS)^T (what fused.py runs)": lambda: fused._matmul_transposed_into(p, q, small),
    }
    start = time.perf_counter()
    lines = []
    for name, piece in pieces.items():
        piece()
        cupy.cuda.Device().synchronize()
        begin = time.perf_counter()
        for _ in range(5):
            piece()
        cupy.cuda.Device().synchronize()
        lines.append(f"{name} {1000 * (time.perf_counter() - begin) / 5:.2f} ms")
    print("attention pieces: " + "; ".join(lines), flush=True)
    record("attention pieces, B=8 H=12 T=1024 D=64", True, "; ".join(lines),
           time.perf_counter() - start)


def main() -> int:
    import cupy

    deadline = time.perf_counter() + float(os.environ.get("GPU_BENCH_SECONDS", "450"))
    left = lambda limit: max(10.0, min(limit, deadline - time.perf_counter()))  # noqa: E731
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy "
          f"{cupy.__version__}", flush=True)
    run("fused kernels vs the array code", [sys.executable, "-m", "pytest", "-p",
        "no:cacheprovider", "tests/test_cuda_kernels.py"], timeout=left(90),
        parse=lambda out: (out.strip().splitlines() or ["?"])[-1][:100])
    start = time.perf_counter()
    try:
        attention_timing()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        record("attention timing", False, traceback.format_exc().splitlines()[-1][:100],
               time.perf_counter() - start)
    start = time.perf_counter()
    try:
        attention_parts()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        record("attention pieces", False, traceback.format_exc().splitlines()[-1][:100],
               time.perf_counter() - start)
    gpt2 = ["--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--context-length", "1024",
            "--batch-size", "8", "--vocab-size", "50257", "--steps", "8", "--warmup", "3"]
    kernels, plain = {"TINYGRAD_LLM_CUDA_KERNELS": "1"}, {"TINYGRAD_LLM_CUDA_KERNELS": "0"}
    # PyTorch runs beside the default (kernels on) of each precision; a profiled run's tokens/s
    # is measured before the profile, so it is unaffected by the profile's clock waits
    for label, flags, env in (("float32, array code, per-op profile", ["--no-torch",
                                                                       "--profile"], plain),
                              ("float32, fused kernels, per-op profile", ["--profile"], kernels),
                              ("float32, fused kernels, flash attention", ["--no-torch"],
                               {**kernels, "TINYGRAD_LLM_FLASH_ATTENTION": "1"}),
                              ("TF32, array code", ["--tf32", "--no-torch"], plain),
                              ("TF32, fused kernels, per-op profile", ["--tf32", "--profile"],
                               kernels),
                              ("float16 mixed, fused kernels, per-op profile, vs PyTorch bf16 "
                               "autocast", ["--dtype", "float16", "--profile"], kernels)):
        run(f"train step GPT-2 124M, B=8, T=1024 ({label})",
            [sys.executable, "bench/train_step.py", "--device", "cuda", *gpt2, *flags],
            timeout=left(120), env=env,
            parse=lambda out: f"ours {value(out, 'tokens_per_s')} tok/s, PyTorch eager "
                              f"{value(out, 'torch_tokens_per_s')}, ratio {value(out, 'ratio')}")
    for label, env in (("", plain), (", fused kernels", kernels)):
        run(f"generate GPT-2 124M, 200 tokens{label}",
            [sys.executable, "bench/generate.py", "--device", "cuda", "--rounds", "2"],
            timeout=left(60), env=env,
            parse=lambda out: f"KV cache {value(out, 'kv_cache_tokens_per_s')} tok/s, no cache "
                              f"{value(out, 'no_cache_tokens_per_s')}")
    start = time.perf_counter()
    try:
        toolkit_on_cuda()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        record("cuda: toolkit", False, traceback.format_exc().splitlines()[-1][:100],
               time.perf_counter() - start)
    run("the test suite on cuda",
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "cuda",
         "--deselect", "tests/test_serve_browser.py", "tests/"], timeout=left(240),
        parse=lambda out: (out.strip().splitlines() or ["?"])[-1][:100])
    width = max(len(name) for name, _, _ in ROWS)
    print("\n" + "check".ljust(width) + " | seconds | result")
    for name, result, seconds in ROWS:
        print(f"{name.ljust(width)} | {seconds:>7} | {result}")
    return 0 if all("FAILED" not in result for _, result, _ in ROWS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
