"""Tokens per second of generation with and without the KV cache, next to PyTorch.

    python bench/generate.py                      # gpt2 preset (124M), random weights, CPU

Generates ``--tokens`` tokens greedily from a short prompt: once recomputing the whole sequence
at every step (``no_cache_tokens_per_s=``, one run), and ``--rounds`` times with the KV cache
(``kv_cache_tokens_per_s=``, the median round), and prints ``speedup=<x>``, the second over the
first. Both produce the same tokens (checked). With PyTorch installed, the same model (the same
weights) also generates in PyTorch eager with its own KV cache -- GPT-2's forward written with
``torch.nn.functional`` under ``torch.inference_mode()`` -- and ``torch_kv_cache_tokens_per_s=``
and ``ratio=`` (ours / PyTorch, both with the cache) are printed, with a check that PyTorch
picked the same tokens.

With the cache the two engines take turns, as in ``train_step.py``: each round generates
``--tokens`` tokens in both, ours first in the even rounds and PyTorch first in the odd ones, so
that both meet the same drift of a shared machine (10-20% within a minute here). Each cached
tokens/s figure is the median round's; ``ratio`` is the median over the rounds of PyTorch's time
over ours, printed with the middle half of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

# bench/ is the script's own folder, first on sys.path
from train_step import blas_kernel, ratio_line

from tinygrad_llm import backend
from tinygrad_llm.generate import generate
from tinygrad_llm.models.gpt import GPT, PRESETS, preset
from tinygrad_llm.tokenizer import GPT2Tokenizer


def torch_weights(model, device: str) -> dict:
    """Our model's weights as PyTorch tensors on ``device`` (made once, outside the timing)."""
    import torch

    return {name: torch.from_numpy(backend.to_numpy(array)).to(device)
            for name, array in model.state_dict().items()}


def torch_generate(model, weights: dict, prompt: list[int], new_tokens: int,
                   device: str) -> list[int]:
    """Greedy generation with a KV cache in PyTorch eager, from our model's weights
    (``torch_weights``)."""
    import torch
    import torch.nn.functional as TF

    config = model.config
    head = weights["wte.weight"] if config.tie_weights else weights["lm_head.weight"]
    H, C = config.n_head, config.n_embd
    caches: list[tuple] = [(None, None)] * config.n_layer

    def forward(ids, start):  # ids (1, T) at positions start.. -> logits of the last (V,)
        x = weights["wte.weight"][ids] + weights["wpe.weight"][start:start + ids.shape[1]]
        for i in range(config.n_layer):
            w = {name: weights[f"h.{i}.{name}"] for name in (
                "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
            h = TF.layer_norm(x, (C,), w["ln_1.weight"], w["ln_1.bias"], config.layer_norm_eps)
            q, k, v = torch.addmm(w["attn.c_attn.bias"], h[0], w["attn.c_attn.weight"]).split(C, 1)
            q, k, v = (z.view(-1, H, C // H).transpose(0, 1) for z in (q, k, v))  # (H, T, D)
            past_k, past_v = caches[i]
            if past_k is not None:
                k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
            caches[i] = (k, v)
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=q.shape[1] > 1)
            y = y.transpose(0, 1).reshape(-1, C)
            x = x + torch.addmm(w["attn.c_proj.bias"], y, w["attn.c_proj.weight"])
            h = TF.layer_norm(x, (C,), w["ln_2.weight"], w["ln_2.bias"], config.layer_norm_eps)
            h = TF.gelu(torch.addmm(w["mlp.c_fc.bias"], h[0], w["mlp.c_fc.weight"]),
                        approximate="tanh")
            x = x + torch.addmm(w["mlp.c_proj.bias"], h, w["mlp.c_proj.weight"])
        last = TF.layer_norm(x[0, -1], (C,), weights["ln_f.weight"], weights["ln_f.bias"],
                             config.layer_norm_eps)
        return head @ last if config.tie_weights else last @ head

    new: list[int] = []
    with torch.inference_mode():
        logits = forward(torch.tensor([prompt], device=device), 0)
        while True:
            new.append(int(logits.argmax()))  # one read per token, as ours does
            if len(new) == new_tokens:
                return new
            logits = forward(torch.tensor([new[-1:]], device=device), len(prompt) + len(new) - 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of --tokens tokens with the KV cache, the engines taking "
                             "turns (default 4)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1:
        parser.error(f"--rounds and --tokens must be at least 1, got {args.rounds} and "
                     f"{args.tokens}")
    try:  # before our first product: MKL, loaded first, would bring Intel's OpenMP (libiomp5)
        import torch  # into the global symbols, and PyTorch's OpenMP calls would bind to it.
        # Imported first, PyTorch runs on its own libgomp, and our MKL on GNU's OpenMP too
        # (docs/performance.md, "Threads beside MKL"; decoding runs no threads of ours)
    except ImportError:
        torch = None
    backend.tune_cpu_allocator()  # reuse freed buffers warm, as `tinygrad-llm` does

    backend.manual_seed(0)
    model = GPT(preset(args.preset)).to(args.device)
    prompt = GPT2Tokenizer().encode(args.prompt)
    print(f"{args.preset}: {model.num_params():,} parameters, prompt {len(prompt)} tokens, "
          f"{args.tokens} new tokens, greedy, device {args.device}")
    print(f"BLAS: {blas_kernel()}")
    generate(model, [prompt], 3, temperature=0)  # warm up

    start = time.perf_counter()
    uncached = generate(model, [prompt], args.tokens, temperature=0, use_cache=False)
    no_cache_rate = args.tokens / (time.perf_counter() - start)
    print(f"no_cache_tokens_per_s={no_cache_rate:.2f}")
    fits = len(prompt) + args.tokens <= model.config.context_length
    compare = torch is not None and fits  # PyTorch's forward here does not crop the context
    device = "cuda" if backend.normalize_device(args.device) == "cuda" else "cpu"
    engines = {"ours": lambda: generate(model, [prompt], args.tokens, temperature=0)[0]}
    if compare:
        weights = torch_weights(model, device)
        torch_generate(model, weights, prompt, 3, device)  # warm up
        engines["torch"] = lambda: torch_generate(model, weights, prompt, args.tokens, device)
    seconds, tokens = {name: [] for name in engines}, {}
    for round_index in range(args.rounds):  # the engines take turns: ours first, then PyTorch
        for name in (list(engines) if round_index % 2 == 0 else list(reversed(engines))):
            start = time.perf_counter()
            tokens[name] = engines[name]()
            seconds[name].append(time.perf_counter() - start)
    rate = {name: args.tokens / float(np.median(times)) for name, times in seconds.items()}
    print(f"kv_cache_tokens_per_s={rate['ours']:.2f}  (median of {args.rounds} rounds)")
    print(f"same tokens: {uncached[0] == tokens['ours']}")
    print(f"tokens_per_s={rate['ours']:.2f}")
    print(f"speedup={rate['ours'] / no_cache_rate:.2f}")
    if not compare:
        print("(PyTorch not installed: no comparison)" if torch is None else
              "(longer than the context: no PyTorch comparison, which does not crop)")
        return
    count = torch.get_num_threads()
    threads = f"{count} thread" + ("s" if count != 1 else "")
    print(f"torch_kv_cache_tokens_per_s={rate['torch']:.2f}  (PyTorch {torch.__version__} eager, "
          f"{threads})")
    print(f"torch same tokens: {tokens['torch'] == tokens['ours']}")
    print(ratio_line(np.array(seconds["torch"]) / np.array(seconds["ours"])))  # theirs / ours


if __name__ == "__main__":
    main()
