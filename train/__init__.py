"""Runnable scripts of tinygrad_llm and the `tinygrad-llm` command (see cli.py).

Each script module has ``add_arguments(parser)`` and ``run(args) -> exit code``; cli.py makes
them sub-commands, and ``standalone`` lets each also run as ``python -m tinygrad_llm.train.NAME`` or ``python train/NAME.py``.
"""

import argparse


def standalone(add_arguments, run, description: str, argv=None) -> int:
    """Parse ``argv`` with a script's arguments and run it."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
