"""Pretrain a GPT on a text corpus (default: the bundled works of Shakespeare, characters).

    tinygrad-llm pretrain                                  # baby char-level GPT on Shakespeare
    tinygrad-llm pretrain --tokenizer gpt2 --out base      # the same on GPT-2 tokens
    tinygrad-llm pretrain --out run --resume               # continue an interrupted run
    tinygrad-llm pretrain --init-from base --data my_texts/ --out more
                                                           # continued pretraining on new text
    tinygrad-llm pretrain --tokens tokens/ --out big       # a corpus made by `prepare`
    mpirun -n 2 tinygrad-llm pretrain --batch-size 12      # data parallel over 2 processes

--resume restores everything from the run folder: the corpus, tokenizer, model, every training
setting, the optimizer and the data position. Only --steps (to train longer), --device, --tf32,
--dtype and --quiet may change; any other flag that contradicts the saved run is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tinygrad_llm import backend, plotting
from tinygrad_llm.checkpoint import is_checkpoint, load_checkpoint
from tinygrad_llm.data import SHAKESPEARE, cached_token_files, read_corpus
from tinygrad_llm.distributed import DataParallel
from tinygrad_llm.loading import build_model, check_finite, load_model
from tinygrad_llm.models.gpt import PRESETS, preset
from tinygrad_llm.nn import Dropout
from tinygrad_llm.plotting import INSTALL_HINT
from tinygrad_llm.prepare import load_prepared
from tinygrad_llm.tokenizer import get_tokenizer, tokenizer_from_config
from tinygrad_llm.train.options import (
    UserError,
    add_device_arguments,
    check_out_folder,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
)
from tinygrad_llm.trainer import LanguageModelingTask, PretrainConfig, Trainer

DEFAULTS = PretrainConfig()
# flag dest -> PretrainConfig field: the training settings a resumed run takes from its folder
TRAIN_FLAGS = {"batch_size": "batch_size", "grad_accum": "grad_accum_steps",
               "lr": "learning_rate", "min_lr": "min_lr", "warmup": "warmup_steps",
               "weight_decay": "weight_decay", "grad_clip": "grad_clip",
               "eval_interval": "eval_interval", "eval_batches": "eval_batches",
               "prompt": "sample_prompt", "sample_tokens": "sample_tokens", "seed": "seed"}
MODEL_FLAGS = ("preset", "n_layer", "n_head", "n_embd", "context_length", "tie_weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    corpus = data.add_mutually_exclusive_group()
    corpus.add_argument("--data", default=str(SHAKESPEARE),
                        help="a .txt file or a folder of them (default: bundled Shakespeare)")
    corpus.add_argument("--tokens", metavar="TOKENS_DIR",
                        help="a folder made by `tinygrad-llm prepare` (read from disk as "
                             "needed; its meta.json sets the tokenizer and the split)")
    data.add_argument("--tokenizer", choices=["char", "gpt2"], default="char",
                      help="characters of the corpus, or GPT-2's BPE (50,257 tokens)")
    data.add_argument("--val-fraction", type=open_fraction, default=0.1,
                      help="the last part of every document kept for validation")
    model = parser.add_argument_group("model (a new one; see --init-from)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="baby",
                       help="model size; the flags below override its values")
    model.add_argument("--n-layer", type=positive_int, help="transformer blocks")
    model.add_argument("--n-head", type=positive_int, help="attention heads per block")
    model.add_argument("--n-embd", type=positive_int, help="width of the residual stream")
    model.add_argument("--context-length", type=positive_int, help="tokens per window")
    model.add_argument("--dropout", type=probability, default=0.0,
                       help="dropout probability while training")
    model.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                       help="share the token embedding with the LM head (default: the preset's)")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=positive_int, default=DEFAULTS.max_steps,
                       help="optimizer steps in all (the schedule's length)")
    train.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                       help="windows per micro-batch")
    train.add_argument("--grad-accum", type=positive_int, default=DEFAULTS.grad_accum_steps,
                       help="micro-batches per optimizer step")
    train.add_argument("--lr", type=positive_float, default=DEFAULTS.learning_rate,
                       help="peak learning rate, after the warmup")
    train.add_argument("--min-lr", type=nonnegative_float, default=DEFAULTS.min_lr,
                       help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup", type=nonnegative_int, default=DEFAULTS.warmup_steps,
                       help="steps of linear warmup")
    train.add_argument("--weight-decay", type=nonnegative_float, default=DEFAULTS.weight_decay,
                       help="AdamW's decoupled weight decay (matrices only)")
    train.add_argument("--grad-clip", type=nonnegative_float, default=DEFAULTS.grad_clip,
                       help="clip the global gradient norm to this (0: no clipping)")
    train.add_argument("--eval-interval", type=positive_int, default=DEFAULTS.eval_interval,
                       help="evaluate, log, sample and checkpoint every this many steps")
    train.add_argument("--eval-batches", type=positive_int, default=DEFAULTS.eval_batches,
                       help="batches per split at each evaluation")
    train.add_argument("--prompt", default=DEFAULTS.sample_prompt,
                       help="prompt of the samples shown at each evaluation")
    train.add_argument("--sample-tokens", type=nonnegative_int, default=DEFAULTS.sample_tokens,
                       help="length of those samples (0: none)")
    train.add_argument("--seed", type=nonnegative_int, default=DEFAULTS.seed,
                       help="seeds initialisation, batches and dropout")
    add_device_arguments(train)
    train.add_argument("--dtype", choices=["float32", "float16"], default=DEFAULTS.dtype,
                       help="float16: mixed precision on a GPU (float16 products, float32 "
                            "weights, dynamic loss scaling)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/pretrain",
                     help="run folder: metrics.jsonl, loss.png, checkpoint/, data/")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out exactly: restores corpus, tokenizer, "
                            "model, settings, optimizer and data position")
    start.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start a new run from an existing model (continued pretraining)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a run that --out already holds")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args) -> PretrainConfig:
    return PretrainConfig(max_steps=args.steps, dtype=args.dtype,
                          **{field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()})


def model_config(args, vocab_size: int):
    overrides = {name: getattr(args, name) for name in ("n_layer", "n_head", "n_embd",
                                                        "context_length", "tie_weights")
                 if getattr(args, name) is not None}
    return preset(args.preset, vocab_size=vocab_size, dropout=args.dropout, **overrides)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def model_conflicts(args, given: set, model: dict, owner: str, with_dropout: bool) -> list:
    """The model flags given on the command line that ask for another model than ``model`` (the
    config of the run being resumed, or of the --init-from model). Repeating the same is fine."""
    if not given & {*MODEL_FLAGS, "dropout"}:
        return []
    asked = model_config(args, model["vocab_size"]).to_dict()
    fields = ["n_layer", "n_head", "n_embd", "context_length", "tie_weights"]
    conflicts = []
    for field in fields + (["dropout"] if with_dropout else []):
        if asked[field] != model[field]:
            flag = field if field in given or field == "dropout" else "preset"
            conflicts.append(f"{_flag(flag)} (gives {field} {asked[field]}; {owner} has "
                             f"{model[field]})")
    return conflicts


def resume_run(args, out: Path):
    """Everything of the run in ``out``: model, tokenizer, config, checkpoint and corpus."""
    if not is_checkpoint(out / "checkpoint"):
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoint'} to resume from")
    checkpoint = load_checkpoint(out / "checkpoint")
    saved = checkpoint["config"]
    if "classifier" in saved:
        raise UserError(f"--resume: {out} holds a classifier; --resume continues pretraining "
                        "runs only")
    if "train" not in saved or "run" not in saved:
        raise UserError(f"--resume: {out / 'checkpoint'} was not written by `tinygrad-llm "
                        "pretrain` (no saved settings); use --init-from to start from it")
    config = PretrainConfig.from_dict(saved["train"])
    run = saved["run"]
    given = getattr(args, "given", set())
    contradictions = [f"{_flag(flag)} {getattr(args, flag)} (the run has "
                      f"{getattr(config, field)})"
                      for flag, field in TRAIN_FLAGS.items()
                      if flag in given and getattr(args, flag) != getattr(config, field)]
    for flag in ("data", "tokens", "tokenizer", "val_fraction"):
        value = getattr(args, flag)
        if flag == "tokens" and value is not None:
            value = Path(value).resolve()  # the run saved it resolved
        if flag in given and str(value) != str(run.get(flag)):
            contradictions.append(f"{_flag(flag)} {getattr(args, flag)} (the run has "
                                  f"{run.get(flag, 'none')})")
    contradictions += model_conflicts(args, given, saved["model"], "the run",
                                      with_dropout=True)
    if contradictions:
        raise UserError("--resume continues the saved run; these flags contradict it: "
                        + "; ".join(contradictions) + ". Drop them, or start a new run")
    if args.steps != config.max_steps and "steps" in given:
        if args.steps <= checkpoint["state"]["step"]:
            raise UserError(f"--steps {args.steps}: the run is already at step "
                            f"{checkpoint['state']['step']}")
        print(f"--steps: training to step {args.steps} instead of {config.max_steps} (the "
              "learning-rate schedule stretches to the new length)", file=sys.stderr)
        config.max_steps = args.steps
    if "dtype" in given:  # like --device, the precision may change between sessions
        config.dtype = args.dtype
    tokenizer = tokenizer_from_config(saved["tokenizer"])
    model = build_model(saved["model"], f"{out / 'checkpoint' / 'config.json'}")
    model.load_state_dict(checkpoint["weights"])
    check_finite(model, out / "checkpoint")
    return model.to(args.device), tokenizer, config, checkpoint, run


def set_dropout(model, p: float) -> None:
    """Change the dropout of a loaded model (continued pretraining with --dropout)."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = p  # attention's dropout on its weights


def new_run(args, prepared: dict | None = None):
    """Model and tokenizer of a new run: from scratch, or --init-from an existing model.
    ``prepared``: the meta.json of --tokens, which fixes the tokenizer."""
    backend.manual_seed(args.seed)
    given = getattr(args, "given", set())
    if args.init_from:
        model, tokenizer, _ = load_model(args.init_from, args.device)
        conflicts = model_conflicts(args, given, model.config.to_dict(), "the model",
                                    with_dropout=False)
        if conflicts:
            raise UserError("--init-from takes the model as it is; these flags ask for another "
                            "shape: " + "; ".join(conflicts))
        if "tokenizer" in given and args.tokenizer != tokenizer.name:
            raise UserError(f"--tokenizer {args.tokenizer}: the model given to --init-from uses "
                            f"the {tokenizer.name!r} tokenizer")
        if "dropout" in given:
            set_dropout(model, args.dropout)
        return model, tokenizer
    if prepared is not None:
        tokenizer = tokenizer_from_config(prepared["tokenizer"])
        if "tokenizer" in given and args.tokenizer != tokenizer.name:
            raise UserError(f"--tokenizer {args.tokenizer}: {args.tokens} was prepared with the "
                            f"{tokenizer.name!r} tokenizer; drop --tokenizer")
    elif args.tokenizer == "char":
        tokenizer = get_tokenizer("char", "".join(read_corpus(args.data)))
    else:
        tokenizer = get_tokenizer("gpt2")
    model = build_model(model_config(args, tokenizer.vocab_size).to_dict())
    return model.to(args.device), tokenizer


def run(args) -> int:
    start_time = time.perf_counter()
    # under mpirun -n N: data parallel over N processes; rank 0 prepares the run folder
    distributed = DataParallel.from_environment()
    main = distributed is None or distributed.is_main
    if main:
        out = check_out_folder(args.out, inputs=[args.init_from, args.data, args.tokens],
                               resume=args.resume, overwrite=args.overwrite)
    if distributed is not None:
        distributed.use_device(args.device)  # on GPUs: one per rank, NCCL between them
        distributed.barrier("waiting for rank 0 to prepare the run folder", timeout=None)
        out = Path(args.out).resolve()
        if args.batch_size < distributed.size and not args.resume:
            raise UserError(f"--batch-size {args.batch_size} is the global batch, split over "
                            f"{distributed.size} processes: give at least {distributed.size}")
    checkpoint = None
    if args.resume:
        model, tokenizer, config, checkpoint, saved_run = resume_run(args, out)
        tokens_dir = saved_run.get("tokens")  # a run on a prepared folder finds it again
        data, val_fraction = saved_run.get("data"), saved_run["val_fraction"]
    else:
        tokens_dir = args.tokens and Path(args.tokens).resolve()
        if tokens_dir and "val_fraction" in getattr(args, "given", set()):
            raise UserError(f"--val-fraction: the split of --tokens {args.tokens} was made by "
                            "`prepare` (its --val-fraction); drop the flag")
        prepared = load_prepared(tokens_dir)[0] if tokens_dir else None
        model, tokenizer = new_run(args, prepared)
        config, data, val_fraction = train_config(args), args.data, args.val_fraction
    if tokens_dir:
        meta, train_tokens, val_tokens = load_prepared(tokens_dir)
        if meta["tokenizer"] != tokenizer.to_config():
            raise UserError(f"the tokens in {tokens_dir} were made by another tokenizer "
                            f"({meta['tokenizer']['type']}) than the model's ({tokenizer.name}, "
                            f"{tokenizer.vocab_size} tokens); prepare the corpus again")
        data, val_fraction = str(tokens_dir), meta["val_fraction"]
        run_info = {"tokens": data, "tokenizer": tokenizer.name, "val_fraction": val_fraction}
    else:
        if not main:  # rank 0 tokenizes into the run folder; the others read its files
            distributed.barrier("waiting for rank 0 to tokenize the corpus", timeout=None)
        train_tokens, val_tokens = cached_token_files(data, tokenizer, out / "data", val_fraction)
        if main and distributed is not None:
            distributed.barrier("waiting for rank 0 to tokenize the corpus", timeout=None)
        run_info = {"data": str(data), "tokenizer": tokenizer.name, "val_fraction": val_fraction}
    context = model.config.context_length
    for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < context + 1:
            raise UserError(f"the {split} split of {data} has {len(tokens)} tokens, fewer than "
                            f"one window of {context} + 1; use more text, a smaller "
                            "--context-length or another --val-fraction")
    task = LanguageModelingTask(tokenizer, train_tokens, val_tokens, context, config,
                                extra={"run": run_info})  # what --resume needs to find the data
    if config.dtype == "float16" and backend.normalize_device(args.device) == "cpu" and main:
        print("warning: --dtype float16 on the CPU is far slower than float32 (NumPy has no fast "
              "float16 matrix products); it is meant for --device cuda", file=sys.stderr)
    trainer = Trainer(model, task, config, out, show_progress=not args.quiet,
                      distributed=distributed)
    if checkpoint is not None:
        trainer.resume(checkpoint)
        if main:
            print(f"resumed at step {trainer.step}", file=sys.stderr)
    if not main:
        trainer.train()
        return 130 if trainer.stopping() else 0
    if distributed is not None:
        print(f"data parallel over {distributed.size} processes: each takes its share of the "
              f"{config.batch_size} windows of every batch", file=sys.stderr)
    print(f"model: {model.num_params():,} parameters, {model.config.n_layer} layers, "
          f"{model.config.n_embd} wide, context {context}; tokenizer {tokenizer.name} "
          f"({tokenizer.vocab_size} tokens); {len(train_tokens):,} training tokens",
          file=sys.stderr)
    record = trainer.train()
    minutes = (time.perf_counter() - start_time) / 60
    if trainer.stopping():
        return 130
    if not plotting.available():  # the trainer drew OUT/loss.png at every evaluation
        print(INSTALL_HINT, file=sys.stderr)
    if record:
        print(f"done in {minutes:.1f} min: step {trainer.step}, train loss "
              f"{record['train_loss']:.4f}, val loss {record['val_loss']:.4f}; checkpoint in "
              f"{trainer.checkpoint_dir}")
    print("\n" + (trainer.last_text or task.sample(model)))  # the last evaluation's sample
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
