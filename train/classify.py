"""Classify text with a finetuned classifier: prints the label and its probability.

    tinygrad-llm classify --checkpoint spam "You have won a free cruise! Call now"
    cat messages.txt | tinygrad-llm classify --checkpoint spam      # one message per line
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygrad_llm.finetune.classification import load_classifier, predict
from tinygrad_llm.train.options import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="classifier folder (finetune-classifier --out) or its checkpoint/")
    parser.add_argument("text", nargs="*",
                        help="text to classify (default: each line of stdin; a blank line "
                             "gets an empty output line, so output lines match input lines)")
    add_device_arguments(parser)


def run(args) -> int:
    folder = Path(args.checkpoint)
    if (folder / "checkpoint").is_dir():
        folder = folder / "checkpoint"
    model, tokenizer, labels, max_length = load_classifier(folder, args.device)
    texts = [" ".join(args.text)] if args.text else [line.rstrip("\r\n") for line in sys.stdin]
    real = [i for i, text in enumerate(texts) if text.strip()]
    probabilities = dict(zip(real, predict(model, tokenizer, [texts[i] for i in real],
                                           max_length), strict=True)) if real else {}
    for i in range(len(texts)):
        if i not in probabilities:
            print()  # a blank input line: nothing to classify, but keep the lines aligned
            continue
        probs = probabilities[i]
        best = int(probs.argmax())
        print(f"{labels[best]}\t{probs[best]:.4f}")
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
