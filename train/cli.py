"""The `tinygrad-llm` command: one sub-command per job.

    tinygrad-llm pretrain   [options]     train a GPT (default: characters of Shakespeare)
    tinygrad-llm generate   --checkpoint DIR --prompt "..."   (this project's or HF GPT-2)
    tinygrad-llm chat       --checkpoint DIR                  chat in the terminal
    tinygrad-llm download   gpt2 --out DIR                    OpenAI's GPT-2 weights
    tinygrad-llm finetune-classifier --checkpoint BASE --out DIR   e.g. spam detection
    tinygrad-llm classify   --checkpoint DIR "text"           label and probability
"""

from __future__ import annotations

import argparse

from tinygrad_llm.train import chat, classify, download, finetune_classifier, pretrain, sample

COMMANDS = {
    "pretrain": (pretrain, "pretrain a GPT on a text corpus"),
    "generate": (sample, "generate text from a checkpoint"),
    "chat": (chat, "chat with a model in the terminal"),
    "download": (download, "download GPT-2 weights from the Hugging Face hub"),
    "finetune-classifier": (finetune_classifier, "finetune a GPT as a text classifier"),
    "classify": (classify, "classify text with a finetuned classifier"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tinygrad-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
