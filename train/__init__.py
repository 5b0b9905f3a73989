"""Runnable scripts of tinygrad_llm and the `tinygrad-llm` command (see cli.py)."""
