"""Throughput and peak memory of `tinygrad-llm prepare` (GPT-2 tokens) on a large corpus.

    python bench/prepare.py                    # ~500 MB: the bundled Shakespeare, copied
    python bench/prepare.py --size-mb 50 --workers 2

Builds the corpus in a temporary folder (every work copied many times, each copy a document of
its own), runs `tinygrad-llm prepare` on it in a child process and prints its rate
(``mb_per_s=``, ``tokens_per_s=``) and the child's peak resident memory (``peak_rss_mb=``, from
getrusage(RUSAGE_CHILDREN)). Then times tiktoken's own ``encode_ordinary_batch`` on the same
documents with the same number of threads, in memory (``tiktoken_mb_per_s=``), and prints
``ratio=`` (prepare / tiktoken). The goals: peak RSS under 1 GB at any size, ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinygrad_llm.data import SHAKESPEARE
from tinygrad_llm.prepare import load_prepared
from tinygrad_llm.tokenizer import gpt2_encoding


def build_corpus(folder: Path, size_bytes: int) -> list[Path]:
    """Copies of the Shakespeare works under ``folder/copyNNNN/`` until ``size_bytes``."""
    works = [(path.name, path.read_bytes()) for path in sorted(SHAKESPEARE.glob("*.txt"))]
    files, total, copy = [], 0, 0
    while total < size_bytes:
        (folder / f"copy{copy:04d}").mkdir(parents=True)
        for name, text in works:
            path = folder / f"copy{copy:04d}" / name
            path.write_bytes(text)
            files.append(path)
            total += len(text)
            if total >= size_bytes:
                break
        copy += 1
    return files


def time_tiktoken(files: list[Path], workers: int, batch_bytes: int = 16 << 20) -> float:
    """Seconds tiktoken's encode_ordinary_batch takes over every file (read outside the timing),
    a batch of documents of about ``batch_bytes`` at a time (the ids are dropped)."""
    encoding = gpt2_encoding()
    seconds, batch, size = 0.0, [], 0
    for index, path in enumerate(files):
        batch.append(path.read_text(encoding="utf-8"))
        size += len(batch[-1])
        if size >= batch_bytes or index == len(files) - 1:
            start = time.perf_counter()
            encoding.encode_ordinary_batch(batch, num_threads=workers)
            seconds += time.perf_counter() - start
            batch, size = [], 0
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=500, help="corpus size in MB (1e6 B)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizing threads, for prepare and for tiktoken alike")
    parser.add_argument("--tmp", default=None, help="where to build the corpus (default: the "
                                                    "system's temporary folder)")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.tmp))
    try:
        files = build_corpus(folder / "corpus", int(args.size_mb * 1e6))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus: {len(files):,} documents, {megabytes:,.1f} MB in {folder}; "
              f"{args.workers} workers")

        command = [sys.executable, "-m", "tinygrad_llm.train.cli", "prepare", "--data",
                   str(folder / "corpus"), "--tokenizer", "gpt2", "--out", str(folder / "tokens"),
                   "--workers", str(args.workers), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True)  # timed with its start-up (about a second)
        seconds = time.perf_counter() - start
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        meta = load_prepared(folder / "tokens")[0]
        tokens = meta["train_tokens"] + meta["val_tokens"]
        print(f"mb_per_s={megabytes / seconds:.2f} tokens_per_s={tokens / seconds:.0f} "
              f"peak_rss_mb={peak_rss_mb:.0f} seconds={seconds:.1f}")

        tiktoken_seconds = time_tiktoken(files, args.workers)
        print(f"tiktoken_mb_per_s={megabytes / tiktoken_seconds:.2f} "
              f"tiktoken_tokens_per_s={(tokens - meta['documents']) / tiktoken_seconds:.0f} "
              f"ratio={tiktoken_seconds / seconds:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
