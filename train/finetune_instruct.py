"""Instruction finetuning: teach a pretrained GPT to follow instructions (a personal assistant).

    tinygrad-llm pretrain --tokenizer gpt2 --context-length 128 --batch-size 6 --out base
    tinygrad-llm finetune-instruct --checkpoint base --out sft
    tinygrad-llm finetune-instruct --checkpoint base --out sft-lora --lora-rank 16
    tinygrad-llm chat --checkpoint sft

--data takes JSON (a list) or JSONL records in the Alpaca shape (instruction, input, output) or
the chat shape (messages: [{role, content}], system/user/assistant, several turns allowed);
default: the bundled 1,100 instruction examples. They are split 85% train, 10% test, 5%
validation with --seed, written to OUT/data/. At the end OUT/metrics.json holds the losses before
and after, OUT/test-responses.jsonl the model's greedy answer to every test example, and
OUT/checkpoint the finetuned model, which remembers its template (generate and chat use it).
With --lora-rank the base stays frozen: OUT/adapter holds the adapter alone, OUT/adapter-peft the
same in Hugging Face PEFT's layout, and OUT/checkpoint the model with the adapter merged in.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import write_json, write_jsonl
from tinygrad_llm.finetune.instruction import (
    INSTRUCTION_DATA,
    TEMPLATES,
    InstructConfig,
    InstructionTask,
    encode_example,
    get_template,
    load_instruction_data,
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

DEFAULTS = InstructConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="base model: a checkpoint or run folder of this project, or a "
                             "Hugging Face GPT-2 folder")
    parser.add_argument("--out", required=True,
                        help="folder for the model, metrics, test responses and data splits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run that --out already holds")
    parser.add_argument("--data", default=None,
                        help="JSON/JSONL instruction data (default: the bundled 1,100 examples)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=DEFAULTS.template,
                        help="prompt format, stored in the checkpoint")
    parser.add_argument("--mask-prompt", action="store_true",
                        help="compute the loss on the response tokens only")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs,
                        help="passes over the training split")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                        help="examples per optimizer step")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS.learning_rate,
                        help="peak learning rate, after the warmup")
    parser.add_argument("--min-lr", type=nonnegative_float, default=DEFAULTS.min_lr,
                        help="learning rate at the end of the cosine decay")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=DEFAULTS.weight_decay,
                        help="AdamW's decoupled weight decay (matrices only)")
    parser.add_argument("--grad-clip", type=nonnegative_float, default=DEFAULTS.grad_clip,
                        help="clip the global gradient norm to this (0: no clipping)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per example; longer ones are cut (default: the model's "
                             "context length)")
    add_lora_arguments(parser, "train a LoRA adapter of this rank instead of every weight "
                               "(0: full finetuning)", dropout=True)
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
    config = InstructConfig(epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.lr, min_lr=args.min_lr,
                            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                            template=args.template, mask_prompt=args.mask_prompt,
                            max_length=args.max_length, seed=args.seed)
    template = get_template(config.template)
    examples = load_instruction_data(args.data or INSTRUCTION_DATA)
    splits = split_examples(examples, seed=config.seed)
    if min(len(s) for s in splits.values()) == 0:
        raise UserError(f"{len(examples)} examples are too few to split 85/10/5 into train, "
                        "test and validation; give at least 20")
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    if tokenizer.eot_token is None:
        raise UserError("instruction finetuning needs a tokenizer with an end-of-text token "
                        "(the model must learn where an answer ends): use a GPT-2-token base")
    context = model.config.context_length
    max_length = min(config.max_length or context, context)
    encoded = {}
    for name, split in splits.items():
        try:
            encoded[name] = [encode_example(e, tokenizer, template) for e in split]
        except ValueError as error:
            raise UserError(f"cannot encode the {name} data: {error}") from None
    write_splits(out / "data", splits)
    cut = sum(len(ids) > max_length for ids, _ in encoded["train"])
    report(f"{len(examples)} examples: train {len(splits['train'])}, validation "
           f"{len(splits['val'])}, test {len(splits['test'])} (written to {out / 'data'}); "
           f"template {template.name}; {cut} training examples are longer than {max_length} "
           "tokens and will be cut")

    backend.manual_seed(config.seed)
    lora = apply_lora_args(model, args)  # its A and B are made on the model's device
    trainable, total = model.num_params(trainable_only=True), model.num_params()
    report(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
           + (f", LoRA rank {args.lora_rank} on {lora['layers']} layers" if lora else ""))

    config = config.for_data(len(encoded["train"]))  # steps, evaluations, warmup
    task = InstructionTask(encoded["train"], encoded["val"], tokenizer, config, max_length)
    model.eval()
    initial = {f"initial_{name}_loss": _no_grad_loss(task, model, encoded[name])
               for name in ("val", "test")}
    model.train()
    report(f"before: validation loss {initial['initial_val_loss']:.4f}, test loss "
           f"{initial['initial_test_loss']:.4f}")
    trainer = Trainer(model, task, config, out, show_progress=not args.quiet, log=report)
    trainer.train()
    model.eval()
    final = {f"{name}_loss": _no_grad_loss(task, model, encoded[name]) for name in ("val", "test")}
    report(f"after (best validation, step {trainer.best['step']}): validation loss "
           f"{final['val_loss']:.4f}, test loss {final['test_loss']:.4f}; writing test "
           "responses ...")
    responses = respond(model, tokenizer, template, splits["test"], args.max_new_tokens)
    write_jsonl(out / "test-responses.jsonl", responses)

    extra = {"finetune": asdict(config), "base": str(args.checkpoint)}
    if lora:
        save_lora_run(out, model, base=str(args.checkpoint))
        extra["lora"] = lora
    save_instruct_model(out / "checkpoint", model, tokenizer, template.name, extra=extra)
    well_formed = sum(r["well_formed"] for r in responses) / max(len(responses), 1)
    metrics = {
        **initial, **final,
        **{key.replace("loss", "perplexity"): math.exp(value)
           for key, value in {**initial, **final}.items()},
        "well_formed_rate": well_formed,
        "trainable_params": trainable, "total_params": total,
        "wall_seconds": time.perf_counter() - started,
        "best_step": trainer.best["step"], "template": template.name,
        "mask_prompt": config.mask_prompt, "lora": lora,
        "splits": {name: len(split) for name, split in splits.items()},
        "history": trainer.history, "config": asdict(config),
    }
    write_json(out / "metrics.json", metrics)
    print(f"test loss {final['test_loss']:.4f} (before: {initial['initial_test_loss']:.4f}, "
          f"ratio {final['test_loss'] / initial['initial_test_loss']:.3f}); well-formed test "
          f"responses {well_formed:.1%}; {metrics['wall_seconds']:.0f} s. Model in "
          f"{out / 'checkpoint'}, metrics in {out / 'metrics.json'}, responses in "
          f"{out / 'test-responses.jsonl'}")
    for r in responses[:3]:
        print(f"\n### {r['instruction']}" + (f"\n({r['input']})" if r["input"] else "")
              + f"\n-> {r['model_response']}\n   (reference: {r['output']})")
    return 130 if trainer.stop_requested else 0


def _no_grad_loss(task, model, examples) -> float:
    from tinygrad_llm.tensor import no_grad

    with no_grad():
        return task.mean_loss(model, examples)


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
