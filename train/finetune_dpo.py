"""DPO: preference-tune an instruction model toward chosen answers and away from rejected ones.

    tinygrad-llm finetune-instruct --checkpoint base --out sft
    tinygrad-llm finetune-dpo --checkpoint sft --out dpo
    tinygrad-llm finetune-dpo --checkpoint sft --out dpo-lora --lora-rank 16

--data takes JSON (a list) or JSONL records with instruction, input (optional), output, chosen and
rejected; default: the bundled 1,100 preference examples. They are split 85% train, 10% test, 5%
validation with --seed (the split of finetune-instruct), written to OUT/data/. The policy starts
from --checkpoint and trains; the reference is the same checkpoint, frozen: its log-probabilities
are computed once, up front, and cached per example. OUT/metrics.jsonl logs loss, reward margin
and reward accuracy per evaluation; OUT/metrics.json holds the values before and after,
OUT/test-responses.jsonl the greedy answer to every test instruction, OUT/checkpoint the tuned
model with the checkpoint's template.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import write_json, write_jsonl
from tinygrad_llm.finetune.dpo import (
    PREFERENCE_DATA,
    DPOCollapseError,
    DPOConfig,
    DPOTask,
    encode_pair,
    load_preference_data,
    reference_logprobs,
)
from tinygrad_llm.finetune.instruction import (
    TEMPLATES,
    get_template,
    respond,
    save_instruct_model,
    split_examples,
    write_splits,
)
from tinygrad_llm.loading import load_model
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
    save_lora_run,
)
from tinygrad_llm.trainer import Trainer

DEFAULTS = DPOConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="the instruction-finetuned model (finetune-instruct's output): the "
                             "policy's start and the frozen reference")
    parser.add_argument("--out", required=True,
                        help="folder for the model, metrics, test responses and data splits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run that --out already holds")
    parser.add_argument("--data", default=None,
                        help="JSON/JSONL preference data (default: the bundled 1,100 examples)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt format (default: the checkpoint's own; required for a "
                             "checkpoint without one)")
    parser.add_argument("--beta", type=positive_float, default=DEFAULTS.beta,
                        help="strength of the pull toward the reference: larger keeps the "
                             "policy closer")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs,
                        help="passes over the training split")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help="preference pairs per optimizer step")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS.learning_rate,
                        help="peak learning rate, after the warmup")
    parser.add_argument("--average-logprobs", action="store_true",
                        help="score an answer by its mean token log-probability instead of the "
                             "sum")
    parser.add_argument("--collapse-limit", type=nonnegative_float,
                        default=DEFAULTS.collapse_limit,
                        help="stop if the chosen answers fall this many nats per token below "
                             "the reference while the margin grows (0: no guard)")
    add_lora_arguments(parser, "train a LoRA adapter of this rank instead of every weight "
                               "(0: full finetuning)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="the longest test response generated")
    parser.add_argument("--seed", type=nonnegative_int, default=DEFAULTS.seed,
                        help="seeds the split, the shuffling and the LoRA initialisation")
    add_device_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def report(line: str) -> None:
    print(line, file=sys.stderr)


def run(args) -> int:
    started = time.perf_counter()
    out = check_out_folder(args.out, inputs=[args.checkpoint, args.data],
                           overwrite=args.overwrite,
                           markers=("checkpoint", "metrics.jsonl", "metrics.json"))
    examples = load_preference_data(args.data or PREFERENCE_DATA)
    splits = split_examples(examples, seed=args.seed)
    if min(len(s) for s in splits.values()) == 0:
        raise UserError(f"{len(examples)} examples are too few to split 85/10/5 into train, "
                        "test and validation; give at least 20")
    model, tokenizer, checkpoint = load_model(args.checkpoint, args.device)
    template_name = args.template or checkpoint["config"].get("template")
    if template_name is None:
        raise UserError(f"{args.checkpoint} has no prompt template (a base model?): DPO starts "
                        "from an instruction model (finetune-instruct); pass --template to use "
                        "this one anyway")
    template = get_template(template_name)
    if tokenizer.eot_token is None:
        raise UserError("DPO needs a tokenizer with an end-of-text token: use a GPT-2-token model")
    config = DPOConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                       min_lr=args.lr / 10, template=template.name, beta=args.beta,
                       average_logprobs=args.average_logprobs,
                       collapse_limit=args.collapse_limit, seed=args.seed)
    max_length = model.config.context_length
    pad = tokenizer.eot_token
    encoded = {name: [encode_pair(e, tokenizer, template) for e in split]
               for name, split in splits.items()}
    write_splits(out / "data", splits)
    cut = sum(max(len(c), len(r)) > max_length for c, r, _ in encoded["train"])
    report(f"{len(examples)} pairs: train {len(splits['train'])}, validation "
           f"{len(splits['val'])}, test {len(splits['test'])} (written to {out / 'data'}); "
           f"template {template.name}; {cut} training pairs are longer than {max_length} tokens "
           "and will be cut")

    reference_started = time.perf_counter()
    reference = {name: reference_logprobs(model, pairs, pad, max_length, config.average_logprobs)
                 for name, pairs in encoded.items()}
    report(f"reference log-probabilities of {sum(len(p) for p in encoded.values())} pairs "
           f"cached in {time.perf_counter() - reference_started:.0f} s")

    backend.manual_seed(config.seed)
    lora = apply_lora_args(model, args)  # its A and B are made on the model's device
    trainable, total = model.num_params(trainable_only=True), model.num_params()
    report(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
           + (f", LoRA rank {args.lora_rank} on {lora['layers']} layers" if lora else "")
           + f"; beta {config.beta}, lr {config.learning_rate}")

    config = config.for_data(len(encoded["train"]))  # steps, evaluations, warmup
    task = DPOTask(encoded["train"], encoded["val"], reference["train"], reference["val"],
                   pad, config, max_length)

    def measure(name: str) -> dict:
        model.eval()
        try:
            return task.measure(model, encoded[name], reference[name])
        finally:
            model.train()

    initial = {f"initial_{name}_{key}": value for name in ("val", "test")
               for key, value in measure(name).items()}
    report(f"before: validation loss {initial['initial_val_loss']:.4f}, reward accuracy "
           f"{initial['initial_val_reward_accuracy']:.3f}")
    trainer = Trainer(model, task, config, out, show_progress=not args.quiet, log=report)
    try:
        trainer.train()
    except DPOCollapseError as error:
        raise UserError(str(error)) from None
    final = {f"{name}_{key}": value for name in ("val", "test")
             for key, value in measure(name).items()}
    model.eval()
    report(f"after: validation loss {final['val_loss']:.4f}, reward margin "
           f"{final['val_reward_margin']:.3f}, reward accuracy "
           f"{final['val_reward_accuracy']:.3f}; writing test responses ...")
    responses = respond(model, tokenizer, template, splits["test"], args.max_new_tokens)
    for response, example in zip(responses, splits["test"], strict=True):
        response["chosen"], response["rejected"] = example["chosen"], example["rejected"]
    write_jsonl(out / "test-responses.jsonl", responses)

    extra = {"finetune": asdict(config), "base": str(args.checkpoint), "dpo": True}
    if lora:
        save_lora_run(out, model, base=str(args.checkpoint))
        extra["lora"] = lora
    save_instruct_model(out / "checkpoint", model, tokenizer, template.name, extra=extra)
    well_formed = sum(r["well_formed"] for r in responses) / max(len(responses), 1)
    metrics = {
        **initial, **final,
        "well_formed_rate": well_formed,
        "trainable_params": trainable, "total_params": total,
        "wall_seconds": time.perf_counter() - started,
        "template": template.name, "beta": config.beta, "lora": lora,
        "splits": {name: len(split) for name, split in splits.items()},
        "history": trainer.history, "config": asdict(config),
    }
    write_json(out / "metrics.json", metrics)
    print(f"validation reward accuracy {final['val_reward_accuracy']:.3f} (margin "
          f"{final['val_reward_margin']:.3f}), test {final['test_reward_accuracy']:.3f} (margin "
          f"{final['test_reward_margin']:.3f}); well-formed test responses {well_formed:.1%}; "
          f"{metrics['wall_seconds']:.0f} s. Model in {out / 'checkpoint'}, metrics in "
          f"{out / 'metrics.json'}, responses in {out / 'test-responses.jsonl'}")
    return 130 if trainer.stop_requested else 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
