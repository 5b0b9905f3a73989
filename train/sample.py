"""Generate text from a checkpoint of this project or a Hugging Face GPT-2 folder.

    tinygrad-llm generate --checkpoint runs/pretrain/checkpoint --prompt "ROMEO:"
    tinygrad-llm generate --checkpoint gpt2-folder --prompt "The meaning of life is" \\
        --temperature 0.7 --top-p 0.9 --stream
"""

from __future__ import annotations

import argparse
import sys

from tinygrad_llm.checkpoint import load_model
from tinygrad_llm.generate import generate_text, stream_text


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="0 = greedy; below 1 sharper, above 1 more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the most likely tokens that make up probability p")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--no-cache", action="store_true", help="recompute instead of KV cache")
    parser.add_argument("--device", default="cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a Hugging Face GPT-2 folder")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop before this string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    add_sampling_arguments(parser)


def sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)


def run(args) -> int:
    try:
        model, tokenizer, _ = load_model(args.checkpoint, args.device)
        tokenizer.encode(args.prompt)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.stream:
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, args.prompt, stop=args.stop,
                                 **sampling_options(args)):
            print(piece, end="", flush=True)
        print()
    else:
        print(args.prompt + generate_text(model, tokenizer, args.prompt, stop=args.stop,
                                          **sampling_options(args)))
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train import standalone

    raise SystemExit(standalone(add_arguments, run, __doc__))
