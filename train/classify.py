"""Classify text with a finetuned classifier: prints the label and its probability.

    tinygrad-llm classify --checkpoint spam "You have won a free cruise! Call now"
    cat messages.txt | tinygrad-llm classify --checkpoint spam      # one message per line
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygrad_llm.finetune.classification import load_classifier, predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="classifier folder (finetune-classifier --out) or its checkpoint/")
    parser.add_argument("text", nargs="*", help="text to classify (default: lines of stdin)")
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    folder = Path(args.checkpoint)
    if (folder / "checkpoint").is_dir():
        folder = folder / "checkpoint"
    try:
        model, tokenizer, labels, max_length = load_classifier(folder, args.device)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    texts = [" ".join(args.text)] if args.text else [line.rstrip("\n") for line in sys.stdin
                                                     if line.strip()]
    if not texts:
        return 0
    try:
        probabilities = predict(model, tokenizer, texts, max_length)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for probs in probabilities:
        best = int(probs.argmax())
        print(f"{labels[best]}\t{probs[best]:.4f}")
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train import standalone

    raise SystemExit(standalone(add_arguments, run, __doc__))
