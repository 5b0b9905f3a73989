"""Runnable scripts of tinygrad_llm and the `tinygrad-llm` command (see cli.py).

Installed as ``tinygrad_llm.train``. Each script module has ``add_arguments(parser)`` and
``run(args) -> exit code``; cli.py makes them sub-commands, and each also runs on its own as
``python train/NAME.py`` or ``python -m tinygrad_llm.train.NAME``.
"""
