"""The `tinygrad-llm` command: one sub-command per job.

    tinygrad-llm prepare    --data FILES --out TOKENS_DIR     tokenize a corpus larger than memory
    tinygrad-llm pretrain   [options]     train a GPT (default: characters of Shakespeare)
    tinygrad-llm generate   --checkpoint DIR --prompt "..."   (this project's or HF GPT-2)
    tinygrad-llm chat       --checkpoint DIR                  chat in the terminal
    tinygrad-llm download   gpt2 --out DIR                    OpenAI's GPT-2 weights
    tinygrad-llm finetune-classifier --checkpoint BASE --out DIR   e.g. spam detection
    tinygrad-llm classify   --checkpoint DIR "text"           label and probability
    tinygrad-llm finetune-instruct --checkpoint BASE --out DIR     a personal assistant
    tinygrad-llm merge-lora --base DIR --adapter DIR --out DIR     fold LoRA into the weights
    tinygrad-llm finetune-dpo --checkpoint SFT --out DIR           prefer chosen over rejected
    tinygrad-llm evaluate perplexity|mc|judge|pairwise ...        measure a model
    tinygrad-llm serve      --checkpoint DIR [--port 8000]    OpenAI API and a chat page

Mistakes in the input end the command with a one-line message and exit code 2 (130 after
Ctrl-C); ``--debug`` (or TINYGRAD_LLM_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from tinygrad_llm import backend
from tinygrad_llm.distributed import launched_ranks
from tinygrad_llm.train import (
    chat,
    classify,
    download,
    evaluate,
    finetune_classifier,
    finetune_dpo,
    finetune_instruct,
    merge_lora,
    prepare,
    pretrain,
    sample,
    serve,
)
from tinygrad_llm.train.options import HelpFormatter, UserError, given_flags, positive_int

COMMANDS = {
    "prepare": (prepare, "tokenize a corpus larger than memory into token files"),
    "pretrain": (pretrain, "pretrain a GPT on a text corpus"),
    "generate": (sample, "generate text from a checkpoint"),
    "chat": (chat, "chat with a model in the terminal"),
    "download": (download, "download GPT-2 weights from the Hugging Face hub"),
    "finetune-classifier": (finetune_classifier, "finetune a GPT as a text classifier"),
    "classify": (classify, "classify text with a finetuned classifier"),
    "finetune-instruct": (finetune_instruct, "finetune a GPT to follow instructions (+ LoRA)"),
    "merge-lora": (merge_lora, "fold a LoRA adapter into its base model"),
    "finetune-dpo": (finetune_dpo, "preference-tune an instruction model with DPO"),
    "evaluate": (evaluate, "evaluate a model: perplexity, multiple choice, LLM judge, arena"),
    "serve": (serve, "serve a model over the OpenAI HTTP API, with a chat page"),
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="use this many CPU threads for the library's own work "
                             "(elementwise ops, layer norm, attention); matrix products run "
                             "on MKL's own threads when MKL is installed, else split over "
                             "them with BLAS on one thread each (default: NumPy's elementwise "
                             "on one thread, BLAS on its own threads, and with numba and MKL "
                             "the compiled kernels on MKL's threads); see "
                             "docs/performance.md for when it helps")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (for bug reports)")


def execute(run, args) -> int:
    """Run a command; turn user errors into one line on stderr and an exit code."""
    if getattr(args, "tf32", False):
        backend.set_tf32(True)
    if getattr(args, "threads", None):
        backend.set_num_threads(args.threads)
    try:
        code = _execute(run, args)
    except BaseException:  # --debug re-raises; an error nobody expected
        if launched_ranks() > 1:
            traceback.print_exc()  # before MPI_Abort ends this process too
        _end_mpi_job(1)
        raise
    if code != 0:
        _end_mpi_job(code)
    return code


def _end_mpi_job(code: int) -> None:
    """One process of an MPI job failed or was interrupted: end the others now, rather than
    when their next collective times out."""
    if launched_ranks() > 1 and "mpi4py.MPI" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        # mpiexec forwards each rank's output through a pipe; Abort kills the job at once and
        # can drop lines still in that pipe (the error message itself). A moment lets them out.
        time.sleep(0.5)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)


def _execute(run, args) -> int:
    debug = getattr(args, "debug", False) or os.environ.get("TINYGRAD_LLM_DEBUG") == "1"
    try:
        return run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted at once: nothing was saved after the last checkpoint, which is "
              "intact", file=sys.stderr)
        return 130
    except (UserError, OSError, ValueError, RuntimeError) as error:
        if debug:
            raise
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message or type(error).__name__}", file=sys.stderr)
        return 2


def run_standalone(module, argv=None) -> int:
    """``python train/NAME.py ...``: one script with the same parsing and error handling."""
    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    add_common_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)
    backend.tune_cpu_allocator()
    return execute(module.run, args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tinygrad-llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=HelpFormatter)
        module.add_arguments(sub)
        add_common_arguments(sub)
        sub.set_defaults(run=module.run)
        subparsers[name] = sub
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = given_flags(subparsers[args.command], argv[argv.index(args.command) + 1:])
    backend.tune_cpu_allocator()  # reuse freed buffers warm: see docs/performance.md
    return execute(args.run, args)


if __name__ == "__main__":
    raise SystemExit(main())
