"""Tokens per second of generation with and without the KV cache.

    python bench/generate.py                      # gpt2 preset (124M), random weights, CPU

Generates ``--tokens`` tokens greedily from a short prompt, once recomputing the whole sequence
at every step and once with the KV cache, and prints both rates and ``speedup=<x>``. Both runs
produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import time

from tinygrad_llm import backend
from tinygrad_llm.generate import generate
from tinygrad_llm.models.gpt import GPT, preset
from tinygrad_llm.tokenizer import GPT2Tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    backend.tune_cpu_allocator()  # reuse freed buffers warm, as `tinygrad-llm` does

    backend.manual_seed(0)
    model = GPT(preset(args.preset)).to(args.device)
    prompt = GPT2Tokenizer().encode(args.prompt)
    print(f"{args.preset}: {model.num_params():,} parameters, prompt {len(prompt)} tokens, "
          f"{args.tokens} new tokens, greedy, device {args.device}")
    generate(model, [prompt], 3, temperature=0)  # warm up

    rates, outputs = {}, {}
    for name, use_cache in (("no_cache", False), ("kv_cache", True)):
        start = time.perf_counter()
        outputs[name] = generate(model, [prompt], args.tokens, temperature=0, use_cache=use_cache)
        rates[name] = args.tokens / (time.perf_counter() - start)
        print(f"{name}_tokens_per_s={rates[name]:.2f}")
    same = outputs["no_cache"] == outputs["kv_cache"]
    print(f"same tokens: {same}")
    print(f"tokens_per_s={rates['kv_cache']:.2f}")
    print(f"speedup={rates['kv_cache'] / rates['no_cache']:.2f}")


if __name__ == "__main__":
    main()
