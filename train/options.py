"""What every command shares: validated argument types, help that shows defaults, one-line
errors, and the rules that protect run folders.

Every numeric flag is checked at parse time (its range, not only its type), so a mistake stops
the command before anything is loaded or written. A run folder that already holds a run is never
overwritten by accident, and no output folder may be (or contain) one of the command's inputs.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path


class UserError(Exception):
    """A mistake in the command's input: printed as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and add "(default: ...)" to every flag's help."""


# ------------------------------------------------------------------- validated types
def _number(kind, text: str, flag_range: str, ok) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected {flag_range}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _number(float, text, "a number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A dropout-like probability in [0, 1)."""
    return _number(float, text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def open_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (a validation share)."""
    return _number(float, text, "a number between 0 and 1 (exclusive)", lambda v: 0 < v < 1)


def top_p(text: str) -> float:
    return _number(float, text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def non_empty(text: str) -> str:
    if text == "":
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---------------------------------------------------------------- explicit flags
def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` of every option spelled out on the command line (not left at its default):
    a resumed run must tell a flag the user typed from a default it never asked for."""
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                given.add(action.dest)
    return given


# ------------------------------------------------------------------ run folders
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_folder(out, inputs=(), resume: bool = False, overwrite: bool = False,
                     markers=("checkpoint", "metrics.jsonl", "metrics.json")) -> Path:
    """Refuse an output folder that would destroy something.

    - an output that is, or contains, one of the inputs (``--checkpoint base --out base``), or
      lies inside an input folder (``--checkpoint base --out base/sft``);
    - an output that already holds a run (any of ``markers``), unless ``resume`` continues it
      or ``overwrite`` says to replace it (its old run files are then removed).
    """
    out = Path(out).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if _inside(source, out):
            raise UserError(f"--out {out} is or contains the input {source}: writing there "
                            "would destroy it; choose another --out")
        if source.is_dir() and _inside(out, source):
            raise UserError(f"--out {out} is inside the input folder {source}: write the new "
                            "run beside it instead")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    existing = [name for name in markers if (out / name).exists()]
    if existing and not resume:
        if not overwrite:
            raise UserError(f"--out {out} already holds a run ({', '.join(existing)}); pass "
                            "--resume to continue it, --overwrite to replace it, or choose "
                            "another --out")
        for name in existing:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return out


def unescape(text: str) -> str:
    """Turn the escapes \\n, \\t and \\\\ typed on a command line into the characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ------------------------------------------------------------------------------ LoRA
def add_lora_arguments(parser: argparse.ArgumentParser, rank_help: str,
                       dropout: bool = False) -> None:
    """--lora-rank, --lora-alpha, --lora-targets (and --lora-dropout): the same in every
    finetuning command."""
    parser.add_argument("--lora-rank", type=nonnegative_int, default=0, help=rank_help)
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scale numerator: the update is (alpha / rank) x A B "
                             "(default: 2 x rank)")
    parser.add_argument("--lora-targets", default="c_attn,c_proj,c_fc",
                        help="comma-separated layer names to adapt")
    if dropout:
        parser.add_argument("--lora-dropout", type=probability, default=0.0,
                            help="dropout on the LoRA path while training")


def apply_lora_args(model, args) -> dict | None:
    """Wrap ``model``'s target layers as the --lora-* flags say (nothing when --lora-rank is
    0); returns the settings, for the run's metrics and config."""
    if not args.lora_rank:
        return None
    from tinygrad_llm.lora import apply_lora

    alpha = args.lora_alpha or 2.0 * args.lora_rank
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    dropout = getattr(args, "lora_dropout", 0.0)
    wrapped = apply_lora(model, rank=args.lora_rank, alpha=alpha, targets=targets,
                         dropout=dropout)
    return {"rank": args.lora_rank, "alpha": alpha, "targets": list(targets),
            "dropout": dropout, "layers": len(wrapped)}


def save_lora_run(out: Path, model, base: str) -> None:
    """OUT/adapter (ours), OUT/adapter-peft (PEFT's layout), then fold the adapter into the
    weights in place, so the model saves as a plain checkpoint."""
    from tinygrad_llm.lora import export_peft, remove_lora, save_adapter

    save_adapter(out / "adapter", model, base=base)
    export_peft(out / "adapter-peft", model)
    remove_lora(model)  # merges every update into its weight, then unwraps


def add_device_arguments(parser) -> None:
    """--device and --tf32, the same in every command that runs a model."""
    parser.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda (CuPy)")
    parser.add_argument("--tf32", action="store_true",
                        help="on a GPU, let float32 matrix products use TF32 tensor cores "
                             "(several times faster, about 1e-3 relative error per product)")
