"""Pretrain a GPT on a text corpus (default: the bundled works of Shakespeare, characters).

    tinygrad-llm pretrain                                  # baby char-level GPT on Shakespeare
    tinygrad-llm pretrain --tokenizer gpt2 --out base      # the same on GPT-2 tokens
    tinygrad-llm pretrain --out run --resume               # continue an interrupted run
    tinygrad-llm pretrain --init-from base/checkpoint --data my_texts/ --out more
                                                           # continued pretraining on new text
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tinygrad_llm import backend, plotting
from tinygrad_llm.checkpoint import is_checkpoint, load_checkpoint, load_model
from tinygrad_llm.data import SHAKESPEARE, corpus_files, load_tokens, prepare_corpus, read_corpus
from tinygrad_llm.models.gpt import GPT, PRESETS, GPTConfig, preset
from tinygrad_llm.plotting import INSTALL_HINT
from tinygrad_llm.tokenizer import get_tokenizer, tokenizer_from_config
from tinygrad_llm.trainer import TrainConfig, Trainer

DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=str(SHAKESPEARE),
                      help="a .txt file or a folder of them (default: bundled Shakespeare)")
    data.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    data.add_argument("--val-fraction", type=float, default=0.1)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="baby")
    model.add_argument("--n-layer", type=int)
    model.add_argument("--n-head", type=int)
    model.add_argument("--n-embd", type=int)
    model.add_argument("--context-length", type=int)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                       help="share the token embedding with the LM head (default: the preset's)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=DEFAULTS.max_steps)
    train.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    train.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum_steps)
    train.add_argument("--lr", type=float, default=DEFAULTS.learning_rate)
    train.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr)
    train.add_argument("--warmup", type=int, default=DEFAULTS.warmup_steps)
    train.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    train.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    train.add_argument("--eval-interval", type=int, default=DEFAULTS.eval_interval)
    train.add_argument("--eval-batches", type=int, default=DEFAULTS.eval_batches)
    train.add_argument("--prompt", default=DEFAULTS.sample_prompt, help="prompt of the samples")
    train.add_argument("--sample-tokens", type=int, default=DEFAULTS.sample_tokens)
    train.add_argument("--seed", type=int, default=DEFAULTS.seed)
    train.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda (CuPy)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/pretrain", help="run folder (metrics, checkpoint)")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue OUT/checkpoint exactly")
    start.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start from an existing model (continued pretraining)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args) -> TrainConfig:
    return TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        learning_rate=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        sample_prompt=args.prompt, sample_tokens=args.sample_tokens, seed=args.seed)


def model_config(args, vocab_size: int) -> GPTConfig:
    overrides = {name: getattr(args, name) for name in ("n_layer", "n_head", "n_embd",
                                                        "context_length", "tie_weights")
                 if getattr(args, name) is not None}
    return preset(args.preset, vocab_size=vocab_size, dropout=args.dropout, **overrides)


def corpus_fingerprint(source) -> list:
    """Names, sizes and modification times: a cheap test that cached tokens are still current."""
    return [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in corpus_files(source)]


def token_files(args, tokenizer, data_dir: Path) -> tuple:
    """Tokenize the corpus into data_dir once; reuse the files while corpus and tokenizer match."""
    meta_path = data_dir / "meta.json"
    fingerprint = corpus_fingerprint(args.data)
    wanted = {"tokenizer": tokenizer.to_config(), "corpus": fingerprint}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if {k: meta.get(k) for k in wanted} != wanted:
        print(f"tokenizing {args.data} ...", file=sys.stderr)
        meta = prepare_corpus(read_corpus(args.data), tokenizer, data_dir, args.val_fraction)
        meta["corpus"] = fingerprint
        meta_path.write_text(json.dumps(meta, indent=1))
    return (load_tokens(data_dir / "train.bin", meta["dtype"]),
            load_tokens(data_dir / "val.bin", meta["dtype"]))


def build(args):
    """Model, tokenizer and (for --resume) the checkpoint to continue from."""
    out = Path(args.out)
    backend.manual_seed(args.seed)
    if args.resume:
        if not is_checkpoint(out / "checkpoint"):
            raise SystemExit(f"--resume: no checkpoint in {out / 'checkpoint'} to resume from")
        checkpoint = load_checkpoint(out / "checkpoint")
        saved = checkpoint["config"]["tokenizer"]
        if saved["type"] != args.tokenizer:
            raise SystemExit(f"--resume: the checkpoint was trained with the {saved['type']!r} "
                             f"tokenizer, not {args.tokenizer!r}; pass --tokenizer {saved['type']}")
        tokenizer = tokenizer_from_config(saved)
        model = GPT(GPTConfig.from_dict(checkpoint["config"]["model"]))
        return model.to(args.device), tokenizer, checkpoint
    if args.init_from:
        model, tokenizer, _ = load_model(args.init_from, args.device)
        if args.tokenizer != tokenizer.name:
            print(f"--init-from: using the model's own {tokenizer.name!r} tokenizer",
                  file=sys.stderr)
        return model, tokenizer, None
    if args.tokenizer == "char":
        tokenizer = get_tokenizer("char", "".join(read_corpus(args.data)))
    else:
        tokenizer = get_tokenizer("gpt2")
    model = GPT(model_config(args, tokenizer.vocab_size))
    return model.to(args.device), tokenizer, None


def run(args) -> int:
    start_time = time.perf_counter()
    try:
        model, tokenizer, checkpoint = build(args)
        train_tokens, val_tokens = token_files(args, tokenizer, Path(args.out) / "data")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = train_config(args)
    if checkpoint is not None:  # a resumed run keeps the settings it started with
        config = TrainConfig.from_dict({**checkpoint["config"].get("train", {}),
                                        "max_steps": args.steps})
    trainer = Trainer(model, tokenizer, train_tokens, val_tokens, config, args.out,
                      show_progress=not args.quiet)
    if checkpoint is not None:
        trainer.resume(checkpoint)
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    print(f"model: {model.num_params():,} parameters, {model.config.n_layer} layers, "
          f"{model.config.n_embd} wide, context {model.config.context_length}; "
          f"tokenizer {tokenizer.name} ({tokenizer.vocab_size} tokens); "
          f"{len(train_tokens):,} training tokens", file=sys.stderr)
    record = trainer.train()
    minutes = (time.perf_counter() - start_time) / 60
    if trainer.stop_requested:
        return 130
    if not plotting.available():  # the trainer drew OUT/loss.png at every evaluation
        print(INSTALL_HINT, file=sys.stderr)
    if record:
        print(f"done in {minutes:.1f} min: step {trainer.step}, train loss "
              f"{record['train_loss']:.4f}, val loss {record['val_loss']:.4f}; checkpoint in "
              f"{trainer.checkpoint_dir}")
    print("\n" + (trainer.last_sample or trainer.sample()))  # the final evaluation's sample
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train import standalone

    raise SystemExit(standalone(add_arguments, run, __doc__))
