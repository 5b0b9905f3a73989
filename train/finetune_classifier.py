"""Finetune a pretrained GPT as a text classifier (default data: the SMS Spam Collection).

    tinygrad-llm pretrain --tokenizer gpt2 --out base
    tinygrad-llm finetune-classifier --checkpoint base --out spam
    tinygrad-llm classify --checkpoint spam "WINNER!! Claim your free prize now"

--data takes a CSV, TSV or JSONL file with a text and a label column (--text-column,
--label-column: names from the header, or 0-based positions for files without one).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

import numpy as np

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import write_json
from tinygrad_llm.finetune.classification import (
    SPAM_DATA,
    ClassifierConfig,
    GPTClassifier,
    balance,
    classification_metrics,
    encode,
    evaluate,
    label_counts,
    read_labeled,
    save_classifier,
    stratified_split,
    train_classifier,
)
from tinygrad_llm.loading import load_model
from tinygrad_llm.plotting import INSTALL_HINT, plot_metrics
from tinygrad_llm.train.options import (
    UserError,
    add_device_arguments,
    add_lora_arguments,
    apply_lora_args,
    check_out_folder,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

DEFAULTS = ClassifierConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="base model: a checkpoint or run folder of this project, or a "
                             "Hugging Face GPT-2 folder")
    parser.add_argument("--out", required=True, help="folder for the classifier and metrics")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a classifier that --out already holds")
    parser.add_argument("--data", default=None,
                        help="CSV/TSV/JSONL file (default: the bundled SMS Spam Collection)")
    parser.add_argument("--text-column", default=None,
                        help="column of the text: a header name, or a 0-based position for "
                             "files without a header (default: text, or 1 for the SMS file)")
    parser.add_argument("--label-column", default=None,
                        help="column of the label (default: label, or 0 for the SMS file)")
    parser.add_argument("--trainable", default=DEFAULTS.trainable,
                        help="auto (all below 20M parameters, else last-block), head, "
                             "last-block, last-N (e.g. last-2) or all")
    parser.add_argument("--pooling", choices=["last", "mean"], default=DEFAULTS.pooling,
                        help="read the last real token's hidden state, or the mean of all")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs,
                        help="passes over the training split")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help="texts per optimizer step")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS.learning_rate,
                        help="peak learning rate, after the warmup")
    parser.add_argument("--min-lr", type=nonnegative_float, default=DEFAULTS.min_lr,
                        help="learning rate at the end of the cosine decay")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=DEFAULTS.weight_decay,
                        help="AdamW's decoupled weight decay (matrices only)")
    parser.add_argument("--grad-clip", type=nonnegative_float, default=DEFAULTS.grad_clip,
                        help="clip the global gradient norm to this (0: no clipping)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per text (default: the longest training text, at most the "
                             "model's context)")
    parser.add_argument("--no-balance", action="store_true",
                        help="keep the class imbalance instead of undersampling")
    parser.add_argument("--seed", type=nonnegative_int, default=DEFAULTS.seed,
                        help="seeds the split, the head's initialisation and the shuffling")
    add_lora_arguments(parser, "train LoRA adapters of this rank on the body (and the new "
                               "head) instead of --trainable (0: no LoRA)")
    add_device_arguments(parser)
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def load_examples(args) -> list:
    if args.data is None:  # the bundled SMS file: label<TAB>text, no header
        return read_labeled(SPAM_DATA, args.text_column or 1, args.label_column or 0)
    return read_labeled(args.data, args.text_column or "text", args.label_column or "label")


def run(args) -> int:
    started = time.perf_counter()
    config = ClassifierConfig(epochs=args.epochs, batch_size=args.batch_size,
                              learning_rate=args.lr, min_lr=args.min_lr,
                              weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                              max_length=args.max_length, trainable=args.trainable,
                              pooling=args.pooling, balance=not args.no_balance, seed=args.seed)
    out = check_out_folder(args.out, inputs=[args.checkpoint, args.data],
                           overwrite=args.overwrite)
    examples = load_examples(args)
    gpt, tokenizer, _ = load_model(args.checkpoint, args.device)
    print(f"{len(examples)} examples: {label_counts(examples)}", file=sys.stderr)
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise UserError(f"the data has a single label ({labels[0]!r}): a classifier needs "
                        "examples of at least two classes")
    if config.balance:
        examples = balance(examples, config.seed)
        print(f"balanced by undersampling: {label_counts(examples)}", file=sys.stderr)
    train, val, test = stratified_split(examples, seed=config.seed)
    if not val or not test:
        raise UserError(f"{len(examples)} examples are too few for a train/validation/test "
                        "split (70/10/20 per class); give more data")
    label_ids = {label: i for i, label in enumerate(labels)}
    window = gpt.config.context_length
    max_length = config.max_length or min(window, max(len(tokenizer.encode(t)) for t, _ in train))
    if max_length > window:
        raise UserError(f"--max-length {max_length} exceeds the model's context {window}")
    train_set, val_set, test_set = (encode(split, tokenizer, label_ids, max_length)
                                    for split in (train, val, test))

    backend.manual_seed(config.seed)  # the new head's initialisation
    model = GPTClassifier(gpt, len(labels), config.pooling)
    if apply_lora_args(model.gpt, args):
        model.head.requires_grad_(True)  # the new head always trains
        trainable = f"lora-{args.lora_rank}"
    else:
        trainable = model.set_trainable(config.trainable)
    model.to(args.device)
    chosen = f"{trainable}, chosen by auto" if config.trainable == "auto" and not args.lora_rank \
        else trainable
    print(f"splits: train {len(train_set)}, validation {len(val_set)}, test {len(test_set)}; "
          f"max length {max_length} tokens; training {model.num_params(trainable_only=True):,} "
          f"of {model.num_params():,} parameters ({chosen})", file=sys.stderr)

    train_started = time.perf_counter()
    trainer = train_classifier(model, train_set, val_set, config, out, args.progress,
                               log=lambda line: print(line, file=sys.stderr))
    train_seconds = time.perf_counter() - train_started
    _, predicted, _ = evaluate(model, test_set)
    truth = np.array([label for _, label in test_set])
    test = classification_metrics(truth, predicted, labels)

    trainable_params = model.num_params(trainable_only=True)
    if args.lora_rank:
        from tinygrad_llm.lora import remove_lora

        remove_lora(model.gpt)  # fold the adapters in: a plain classifier to save and load
    save_classifier(out / "checkpoint", model, tokenizer, labels, max_length,
                    extra={"finetune": asdict(config), "base": str(args.checkpoint)})
    kept = trainer.best  # the evaluation whose weights we keep
    metrics = {
        "train_accuracy": kept["train_accuracy"],
        "val_accuracy": kept["val_accuracy"],
        "test_accuracy": test["accuracy"],
        "best_epoch": kept["epoch"],
        **{f"test_{k}": v for k, v in test.items() if k != "accuracy"},
        "labels": labels,
        "splits": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
        "trainable": trainable,
        "trainable_params": trainable_params,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "history": trainer.history,
        "config": asdict(config),
    }
    write_json(out / "metrics.json", metrics)
    if not plot_metrics(trainer.history, out / "curves.png"):  # loss and accuracy per epoch
        print(INSTALL_HINT, file=sys.stderr)
    print(f"epoch {kept['epoch']}: train accuracy {metrics['train_accuracy']:.4f}, "
          f"validation {metrics['val_accuracy']:.4f}"
          f", test {metrics['test_accuracy']:.4f}")
    if len(labels) == 2:
        print(f"test precision {test['precision']:.4f}, recall {test['recall']:.4f}, "
              f"F1 {test['f1']:.4f} (positive class: {test['positive_label']})")
    print("confusion matrix (rows: true, columns: predicted; " + ", ".join(labels) + "):")
    for label, row in zip(labels, test["confusion_matrix"], strict=True):
        print(f"  {label:>12}: {row}")
    print(f"classifier saved in {out / 'checkpoint'}; metrics in {out / 'metrics.json'}")
    return 130 if trainer.stop_requested else 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
