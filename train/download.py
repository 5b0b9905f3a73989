"""Download OpenAI's GPT-2 weights (Hugging Face layout) into a folder.

    tinygrad-llm download gpt2 --out gpt2
    tinygrad-llm generate --checkpoint gpt2 --prompt "Hello, I'm a language model,"

Needs a network connection; an interrupted download resumes when run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygrad_llm.hf import HUB_NAMES, download_gpt2
from tinygrad_llm.train.options import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(HUB_NAMES), help="which GPT-2")
    parser.add_argument("--out", help="folder to write (default: the cache folder, "
                                      "~/.cache/tinygrad_llm/hf/NAME or $TINYGRAD_LLM_CACHE)")


def run(args) -> int:
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder to download into")
    try:
        folder = download_gpt2(args.name, out=args.out)
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
