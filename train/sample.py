"""Generate text from a checkpoint: greedy, temperature and top-k sampling.

    tinygrad-llm generate --checkpoint runs/pretrain/checkpoint --prompt "ROMEO:"
"""

from __future__ import annotations

import argparse
import sys

from tinygrad_llm.checkpoint import load_model
from tinygrad_llm.generate import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="0 = greedy; below 1 sharper, above 1 more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    try:
        model, tokenizer, _ = load_model(args.checkpoint, args.device)
        prompt = tokenizer.encode(args.prompt)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ids = generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(tokenizer.decode(ids[0]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
