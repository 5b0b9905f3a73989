"""Generate text from a checkpoint of this project or a Hugging Face GPT-2 folder.

    tinygrad-llm generate --checkpoint runs/pretrain/checkpoint --prompt "ROMEO:"
    tinygrad-llm generate --checkpoint gpt2-folder --prompt "The meaning of life is" \\
        --temperature 0.7 --top-p 0.9 --stream
"""

from __future__ import annotations

import argparse
import sys

from tinygrad_llm.finetune.instruction import get_template
from tinygrad_llm.generate import generate_text, stream_text
from tinygrad_llm.loading import load_model
from tinygrad_llm.train.options import (
    UserError,
    add_device_arguments,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    top_p,
    unescape,
)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=200,
                        help="tokens to generate at most")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.8,
                        help="0 = greedy; below 1 sharper, above 1 more random")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="sample among the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=top_p, default=None,
                        help="sample among the most likely tokens whose probabilities add up "
                             "to at least p (default: all)")
    parser.add_argument("--seed", type=nonnegative_int, default=None,
                        help="makes sampling reproducible")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence each step instead of a KV cache")
    add_device_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a Hugging Face GPT-2 folder")
    parser.add_argument("--prompt", default="\n",
                        help="text to continue; \\n and \\t are understood as escapes")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop before this string (repeatable); \\n and \\t are understood, "
                             "so --stop '\\n\\n' stops at a blank line")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--raw", action="store_true",
                        help="continue the prompt as it is, even for a model finetuned with an "
                             "instruction template (by default its prompt is wrapped in that "
                             "template and only the answer is printed)")
    add_sampling_arguments(parser)


def sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)


def run(args) -> int:
    prompt, stop = unescape(args.prompt), [unescape(s) for s in args.stop]
    if not prompt:
        raise UserError("--prompt is empty: give at least one character to continue")
    if any(not s for s in stop):
        raise UserError("--stop is empty: give the text to stop at")
    model, tokenizer, checkpoint = load_model(args.checkpoint, args.device)
    shown = prompt
    template = checkpoint["config"].get("template")
    if template and not args.raw:  # an instruction-tuned model: ask it in its own template
        template = get_template(template)
        prompt = template.prompt([{"role": "user", "content": prompt}])
        stop, shown = [*stop, *template.stop], ""
    tokenizer.encode(prompt)  # a character the tokenizer does not know: a clear error now
    if args.stream:
        print(shown, end="", flush=True)
        for piece in stream_text(model, tokenizer, prompt, stop=stop,
                                 **sampling_options(args)):
            print(piece, end="", flush=True)
        print()
    else:
        print(shown + generate_text(model, tokenizer, prompt, stop=stop,
                                          **sampling_options(args)))
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
