"""Tokenize a corpus of any size once, into a folder that `pretrain --tokens` trains on.

    tinygrad-llm prepare --data corpus/ --tokenizer gpt2 --out tokens/
    tinygrad-llm pretrain --tokens tokens/ --out run

Reads .txt files (one document each), .jsonl files (one {"text": "..."} document per line) and
.gz of either; a folder is searched for them recursively. Writes train.bin and val.bin (flat
uint16 ids, uint32 past 65,536 tokens) and meta.json, holding only a few batches of text in memory
and tokenizing on every core. With 20 documents or more, about --val-fraction of the documents
go to validation whole; with fewer, the last --val-fraction of each one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tinygrad_llm.prepare import prepare_tokens
from tinygrad_llm.train.options import UserError, open_fraction, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help=".txt / .jsonl / .gz files, or folders of them")
    parser.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2",
                        help="GPT-2's BPE (50,257 tokens) or the characters of the corpus")
    parser.add_argument("--out", required=True, metavar="TOKENS_DIR",
                        help="folder for train.bin, val.bin and meta.json")
    parser.add_argument("--val-fraction", type=open_fraction, default=0.1,
                        help="share of the documents (or of each document, when fewer than "
                             "20) kept for validation")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="threads that tokenize")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a prepared corpus that --out already holds")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / "meta.json").exists() and not args.overwrite:
        raise UserError(f"--out {out} already holds a prepared corpus (meta.json); pass "
                        "--overwrite to replace it, or choose another --out")
    for source in args.data:
        if Path(source).resolve() == out.resolve():
            raise UserError(f"--out {out} is also an input (--data {source}); choose another "
                            "--out")
    start = time.perf_counter()
    meta = prepare_tokens(args.data, args.tokenizer, out, args.val_fraction,
                          workers=args.workers, progress=not args.quiet)
    seconds = time.perf_counter() - start
    held_out = "whole documents" if meta["split"] == "documents" else "each document's tail"
    print(f"{meta['documents']:,} documents, {meta['bytes'] / 1e6:,.1f} MB in {seconds:.1f} s "
          f"({meta['bytes'] / 1e6 / seconds:.1f} MB/s) -> {meta['train_tokens']:,} training and "
          f"{meta['val_tokens']:,} validation tokens ({meta['dtype']}; validation: {held_out}) "
          f"in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
