"""Fold a LoRA adapter into its base model and save the result as a plain checkpoint.

    tinygrad-llm merge-lora --base gpt2 --adapter run/adapter --out merged
    tinygrad-llm generate --checkpoint merged --prompt "..."

Every adapted weight becomes W + (alpha / r) A @ B; the merged model has the base's shape and
tokenizer and runs as fast as the base. --adapter takes a folder written by this project
(adapter.safetensors) or a Hugging Face PEFT LoRA adapter of GPT-2 (adapter_model.safetensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygrad_llm.loading import check_finite, load_model, save_model
from tinygrad_llm.lora import load_adapter, remove_lora
from tinygrad_llm.train.options import UserError, check_out_folder

CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "state.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="the base model the adapter was trained on: a checkpoint or run "
                             "folder of this project, or a Hugging Face GPT-2 folder")
    parser.add_argument("--adapter", required=True,
                        help="the adapter folder: adapter.safetensors + adapter_config.json "
                             "(this project) or adapter_model.safetensors (PEFT)")
    parser.add_argument("--out", required=True,
                        help="folder for the merged checkpoint (new, empty, or an earlier "
                             "merge with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint that --out already holds")


def run(args) -> int:
    # resume=overwrite: an old merge stays on disk until the new checkpoint replaces it whole
    # (atomically), so a failure below loses nothing
    out = check_out_folder(args.out, inputs=[args.base, args.adapter], resume=args.overwrite,
                           markers=CHECKPOINT_FILES)
    others = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES) \
        if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds other files ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); the checkpoint replaces the "
                        "folder whole, so choose a new or empty folder")
    if not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter} is not a folder")
    model, tokenizer, _ = load_model(args.base)
    wrapped = load_adapter(args.adapter, model)
    config = model.lora_config
    if config.base and Path(config.base).exists() and \
            Path(config.base).resolve() != Path(args.base).resolve():
        print(f"note: the adapter was trained on {config.base}, merging into {args.base}",
              file=sys.stderr)
    remove_lora(model)
    check_finite(model, f"the merge of {args.adapter} into {args.base}")
    save_model(out, model, tokenizer, extra={"merged_lora": {
        "base": str(args.base), "adapter": str(args.adapter), "rank": config.rank,
        "alpha": config.alpha, "layers": len(wrapped)}})
    print(f"merged {len(wrapped)} layers (rank {config.rank}, alpha {config.alpha:g}) of "
          f"{args.adapter} into {args.base}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
