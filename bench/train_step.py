r"""Time whole training steps (forward, backward, clipping, AdamW) on random tokens.

    python bench/train_step.py                                   # the baby configuration
    python bench/train_step.py --n-layer 6 --n-head 6 --n-embd 384 --context-length 256 \
        --batch-size 8

Prints ``tokens_per_s=<float>``; with PyTorch installed, also the same model and step in PyTorch
eager (``torch_tokens_per_s=``) and ``ratio=`` (our tokens/s over PyTorch's: PyTorch's step time
over ours). Both use float32 and the same number of threads, each engine in a process of its own
(``TorchProcess``), and they take turns: rounds of about half a second of steps, ours then
PyTorch's, then PyTorch's then ours, ... (``time_steps``). On a machine shared with other
tenants the speed drifts by 10-20% within a minute; taking turns, both engines meet the same
drift. Each tokens/s figure is from the median round; ``ratio`` is the median over the rounds of
PyTorch's step time over ours, printed with the middle half of the rounds' ratios (their spread
is the noise of that run). The BLAS kernel NumPy picked is printed too: an environment that
forces an older one (OPENBLAS_CORETYPE) changes our figure a lot and PyTorch's not at all.

The model flags are spelled as in ``tinygrad-llm pretrain``; the older spellings (``--n_layer``,
``--block``, ``--batch``, ``--vocab`` ...) still work.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time

import numpy as np

from tinygrad_llm import backend, blas, cpu_kernels
from tinygrad_llm import functional as F
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.optim import AdamW, LossScaler, clip_grad_norm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the CLI's spelling first; the older ones stay as aliases so existing commands still run
    parser.add_argument("--n-layer", "--n_layer", dest="n_layer", type=int, default=4)
    parser.add_argument("--n-head", "--n_head", dest="n_head", type=int, default=4)
    parser.add_argument("--n-embd", "--n_embd", dest="n_embd", type=int, default=128)
    parser.add_argument("--context-length", "--context_length", "--block", dest="context_length",
                        type=int, default=64)
    parser.add_argument("--batch-size", "--batch_size", "--batch", dest="batch_size", type=int,
                        default=12)
    parser.add_argument("--vocab-size", "--vocab_size", "--vocab", dest="vocab_size", type=int,
                        default=65)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="float16: ours mixed precision (float16 products, float32 weights, "
                             "loss scaling), PyTorch bfloat16 autocast")
    parser.add_argument("--tf32", action="store_true",
                        help="GPU: float32 matrix products on TF32 tensor cores, in both engines")
    parser.add_argument("--threads", type=int, default=None,
                        help="ours: backend.set_num_threads (as the CLI's --threads: the "
                             "library's own work over this many threads, products on MKL's or "
                             "split over them); PyTorch: torch.set_num_threads. Default: NumPy "
                             "and BLAS as they come; PyTorch's default")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--profile", action="store_true",
                        help="after the timing, time every op's forward and backward over a few "
                             "more steps and print where a step's time goes")
    return parser.parse_args(argv)


def batches(args, count):
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.context_length)
    return [(rng.integers(0, args.vocab_size, shape), rng.integers(0, args.vocab_size, shape))
            for _ in range(count)]


# How the engines take turns: in rounds of about ROUND_SECONDS of steps, each round after a pause
# of SETTLE_SECONDS. Both engines keep threads that spin for a while after their last op (MKL's
# or OpenBLAS's for ours, OpenMP's for PyTorch's) and slow whatever runs next on the cores; steps
# run back to back across engines measured PyTorch 40% slower than alone. The pause lets them
# sleep first.
SETTLE_SECONDS = 0.3
ROUND_SECONDS = 0.5


class Engine:
    """One engine's training step over its own copy of the batches, in this process."""

    def __init__(self, step, batches, sync=lambda: None):
        self.step, self.batches, self.sync = step, batches, sync

    def run(self, indices) -> float:
        """Seconds taken by the steps on these batches, one after another."""
        start = time.perf_counter()
        for i in indices:
            self.step(*self.batches[i])
        self.sync()
        return time.perf_counter() - start


class TorchProcess:
    """PyTorch's engine in a process of its own, run a round at a time from this one.

    Why not in this process: the two engines would share one OpenMP runtime. When MKL is loaded
    first, Intel's OpenMP (libiomp5) comes with it, and PyTorch's OpenMP calls bind to that
    instead of to its own libgomp; when PyTorch is imported first, MKL picks GNU's OpenMP, and its
    threads spin after every product in the way of our own threads. Each engine in its own
    process runs as its users run it."""

    def __init__(self, args, data):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter, nothing loaded
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_torch_engine, args=(child, args, data),
                                       daemon=True)
        self.process.start()
        self.version, self.threads = self._receive()

    def _receive(self):
        try:
            return self.connection.recv()
        except EOFError:
            raise SystemExit("PyTorch's process ended (its error is above)") from None

    def run(self, indices) -> float:
        self.connection.send(list(indices))
        return self._receive()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def _torch_engine(connection, args, data) -> None:
    """The child process of TorchProcess: build PyTorch's model, then run what it is sent."""
    import torch

    step, sync, torch_data = make_torch(args, data)
    engine = Engine(step, torch_data, sync)
    connection.send((torch.__version__, torch.get_num_threads()))
    while (indices := connection.recv()) is not None:
        connection.send(engine.run(indices))


def time_steps(engines, batch_count: int, warmup: int) -> list:
    """Seconds per step of each engine (``Engine`` or ``TorchProcess``) over batches
    ``warmup .. batch_count - 1``. The engines take turns after ``warmup`` untimed steps each. A
    turn is a round of consecutive steps lasting about ROUND_SECONDS, after a pause of
    SETTLE_SECONDS and, when a step is shorter than a round, one untimed step (the first after a
    pause finds cold caches). The order of the engines alternates from round to round. Returns,
    per engine, the mean step time of each of its rounds; all engines get the same number of
    rounds."""
    slowest = 0.0  # the slowest engine's step (the fastest of its warm-up steps: the first ones
    for engine in engines:  # compile, allocate and fill caches)
        fastest = min((engine.run([i]) for i in range(warmup)), default=math.inf)
        slowest = max(slowest, fastest)
    timed = range(warmup, batch_count)  # indices of the timed batches
    per_round = max(1, min(len(timed), round(ROUND_SECONDS / max(slowest, 1e-9))))
    rounds = [timed[i:i + per_round] for i in range(0, len(timed), per_round)]
    seconds = [[] for _ in engines]
    for r, indices in enumerate(rounds):
        order = list(enumerate(engines))
        for k, engine in order if r % 2 == 0 else order[::-1]:
            time.sleep(SETTLE_SECONDS)
            if per_round > 1:
                engine.run(indices[:1])
            seconds[k].append(engine.run(indices) / len(indices))
    return seconds


def ratio_line(pairs) -> str:
    """``ratio=`` from the rounds' ratios (PyTorch's time over ours, one per round): their median,
    and the middle half of them -- their spread is the noise of the run."""
    return (f"ratio={float(np.median(pairs)):.3f}  (median over {len(pairs)} rounds, the engines "
            f"taking turns; the middle half of the rounds: {np.percentile(pairs, 25):.3f}-"
            f"{np.percentile(pairs, 75):.3f})")


def profile_steps(step, data, sync=lambda: None) -> None:
    """Run ``step`` over ``data`` with a timer around every Function's forward and backward, the
    optimizer and the clipping; print the ops by total time. The timers add a little overhead
    (two clock reads per op), so the total is a bit above the step time measured without them.
    On a GPU, ``sync`` waits for the queued kernels before each clock read, so an op's time is
    its kernels' time (and the GPU no longer runs ahead of the Python code)."""
    from tinygrad_llm import optim
    from tinygrad_llm.tensor import Function

    times: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    apply = Function.apply.__func__
    backwards = {}  # each Function class seen -> the backward it had before its timer

    def timed_apply(cls, *tensors, **params):
        sync()
        start = time.perf_counter()
        out = apply(cls, *tensors, **params)
        sync()
        name = cls.__name__
        times[name + " forward"] = times.get(name + " forward", 0.0) + time.perf_counter() - start
        if cls not in backwards:
            # the timer goes on the class (its own attribute, so a subclass is timed under its
            # own name), not on each recorded op: a wrapper stored on the op would point back at
            # it, and that cycle would keep every op's saved arrays alive until Python's garbage
            # collector found them, so each step would run on fresh (page-faulting) memory
            original = untimed_backward(cls)
            backwards[cls] = cls.__dict__.get("backward")
            cls.backward = timed(name + " backward", original)
        return out

    def untimed_backward(cls):  # the backward cls would run without timers
        for k in cls.__mro__:
            own = backwards[k] if k in backwards else k.__dict__.get("backward")
            if own is not None:
                return own
        raise TypeError(f"{cls.__name__} has no backward")

    saved = Function.apply, optim.AdamW.step
    Function.apply = classmethod(timed_apply)
    optim.AdamW.step = timed("AdamW step", optim.AdamW.step)
    sync()
    start = time.perf_counter()
    try:
        for x, y in data:
            step(x, y)
        sync()
    finally:
        Function.apply, optim.AdamW.step = saved
        for cls, backward in backwards.items():  # each class's backward as it was
            if backward is None:
                del cls.backward
            else:
                cls.backward = backward
    total = time.perf_counter() - start
    times["graph walk, clipping and the rest"] = total - sum(times.values())
    blas = sum(t for name, t in times.items() if name.split()[0] in ("Linear", "MatMul"))
    head = sum(t for name, t in times.items() if name.startswith("LinearCrossEntropy"))
    print(f"\nprofile over {len(data)} steps: {1000 * total / len(data):.0f} ms per step; "
          f"matrix products (Linear, MatMul) {100 * blas / total:.0f}%, the fused LM head and "
          f"loss {100 * head / total:.0f}%, the rest {100 * (total - blas - head) / total:.0f}%")
    print(f"{'op':<40} {'ms/step':>8} {'share':>6}")  # the top ops first
    for name, seconds in sorted(times.items(), key=lambda item: -item[1]):
        print(f"{name:<40} {1000 * seconds / len(data):>8.1f} {100 * seconds / total:>5.1f}%")


def make_ours(args):
    """Our model, optimizer and training step: returns (step, sync)."""
    backend.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab_size, context_length=args.context_length,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(args.device)
    optimizer = AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    mixed = args.dtype == "float16"
    scaler = LossScaler() if mixed else None

    def step(x, y):
        with F.autocast(np.float16 if mixed else None):
            loss = model.loss(x, y)  # = F.cross_entropy(model(x), y), LM head and loss fused
        (loss * scaler.scale if mixed else loss).backward()
        if mixed:  # as the trainer does, minus the overflow check's skip
            scaler.unscale(optimizer.params)
        clip_grad_norm(optimizer.params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    sync = lambda: None  # noqa: E731
    if backend.normalize_device(args.device) == "cuda":
        sync = backend.array_module("cuda").cuda.Device().synchronize
    return step, sync


def make_torch(args, data):
    """The same model, optimizer and step in PyTorch eager: returns (step, sync, data as torch
    tensors)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if backend.normalize_device(args.device) == "cuda" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # PyTorch's default is off

    class Block(nn.Module):
        def __init__(self, c, h):
            super().__init__()
            self.h = h
            self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.fc, self.proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.proj(nn.functional.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(args.vocab_size, args.n_embd)
            self.wpe = nn.Embedding(args.context_length, args.n_embd)
            self.h = nn.ModuleList([Block(args.n_embd, args.n_head) for _ in range(args.n_layer)])
            self.ln_f = nn.LayerNorm(args.n_embd)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied head

    model = TorchGPT().to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": other, "weight_decay": 0.0}], lr=1e-4,
                                  betas=(0.9, 0.99))
    torch_data = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
                  for x, y in data]

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "float16")

    def step(x, y):
        with autocast:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync, torch_data


def blas_kernel() -> str:
    """Which BLAS libraries are loaded, their kernel or version and threads (threadpoolctl), and
    which one multiplies: MKL when installed (tinygrad_llm.blas), else NumPy's."""
    from threadpoolctl import threadpool_info

    on_mkl = blas.mkl() is not None  # loads it when installed, as the first product would
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    loaded = ", ".join(f"{i['internal_api']} {i.get('architecture') or i.get('version')} "
                       f"x{i['num_threads']}" for i in infos) or "unknown"
    return loaded + ("; products on mkl (TINYGRAD_LLM_MKL=0: on NumPy's)" if on_mkl else "")


def cpu_kernels_state() -> str:
    """Whether the numba kernels of cpu_kernels.py run (layer norm, GELU, softmax, AdamW)."""
    if os.environ.get("TINYGRAD_LLM_CPU_KERNELS") == "0":
        return "off (TINYGRAD_LLM_CPU_KERNELS=0)"
    if not cpu_kernels.available():
        return 'off (pip install "tinygrad-llm[cpu]" for numba)'
    from importlib.metadata import version

    return f"numba {version('numba')}"


def kernel_threads() -> str:
    """Where the compiled kernels run when the library's threads are not asked for: on MKL's
    team of threads when they can share it (cpu_kernels.team_threads), else on one."""
    if cpu_kernels_state().startswith("off"):
        return ""
    threads = cpu_kernels.team_threads()  # starts numba's threading layer, as the first op would
    return (f", the compiled kernels on MKL's team of {threads}" if threads > 1
            else ", the compiled kernels on one")


def main(argv=None) -> None:
    args = parse_args(argv)
    tuned = backend.tune_cpu_allocator()  # reuse freed buffers warm, as `tinygrad-llm` does
    backend.set_tf32(args.tf32)
    if args.threads:
        backend.set_num_threads(args.threads)  # as `tinygrad-llm --threads` does
    data = batches(args, args.warmup + args.steps)
    tokens = args.batch_size * args.context_length
    params = (12 * args.n_layer * args.n_embd ** 2
              + (args.vocab_size + args.context_length) * args.n_embd)
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, context "
          f"{args.context_length}, batch {args.batch_size}, vocab {args.vocab_size} "
          f"(~{params / 1e6:.2f}M params), device {args.device}, {args.dtype}"
          f"{' (PyTorch: bfloat16 autocast)' * (args.dtype == 'float16')}{', TF32' * args.tf32}")
    print(f"numpy {np.__version__}, BLAS: {blas_kernel()}, CPU allocator tuned: {tuned}, "
          f"compiled CPU kernels: {cpu_kernels_state()}; "
          + (f"threads: {args.threads} (the library's own work split over them; products "
             + ("on MKL's threads)" if blas.mkl() is not None else
                "split over them too, BLAS on one thread per call)") if args.threads else
             f"threads: NumPy's elementwise on one, BLAS on its own{kernel_threads()}"))
    ours_step, ours_sync = make_ours(args)
    engines = [Engine(ours_step, data, ours_sync)]
    torch_engine = None
    if not args.no_torch and importlib.util.find_spec("torch") is None:
        print("(PyTorch not installed: no comparison)")
    elif not args.no_torch:  # the same batches, in a process of its own (TorchProcess says why)
        torch_engine = TorchProcess(args, data)
        engines.append(torch_engine)
    seconds = time_steps(engines, len(data), args.warmup)
    median = [float(np.median(s)) for s in seconds]
    print(f"tokens_per_s={tokens / median[0]:.1f}")
    if torch_engine is not None:
        torch_engine.close()
        pairs = np.array(seconds[1]) / np.array(seconds[0])  # PyTorch's time / ours, by round
        threads = f"{torch_engine.threads} thread" + ("s" if torch_engine.threads != 1 else "")
        print(f"torch_tokens_per_s={tokens / median[1]:.1f}  (PyTorch {torch_engine.version} "
              f"eager, {threads}, in a process of its own)")
        print(ratio_line(pairs))
    if args.profile:
        profile_steps(ours_step, data[args.warmup:], ours_sync)


if __name__ == "__main__":
    main()
