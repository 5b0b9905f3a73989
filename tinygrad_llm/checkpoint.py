"""Checkpoint folders: safetensors weights and JSON metadata, written atomically. Folder I/O only:
building a model from what is read here is ``loading.py``'s job.

    DIR/model.safetensors       parameter name -> array
    DIR/optimizer.safetensors   optimizer moments (only while training)
    DIR/config.json             {"model": {...GPTConfig...}, "tokenizer": {...}, ...}
    DIR/state.json              training position: step, data position, ...

Nothing is ever unpickled. A save writes a sibling temporary folder ``.DIR.tmp-*`` and swaps it in
with two renames (DIR -> ``.DIR.old``, temporary -> DIR). A kill between the two renames leaves
only ``.DIR.old``: readers fall back to it and the next save puts it back first, so at every
moment one complete checkpoint can be found. Temporaries of killed saves are removed by the next
save.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

FORMAT = "tinygrad_llm.checkpoint/1"
REQUIRED = ("model.safetensors", "config.json")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, read-only folder ...); the previous one is
    intact."""


def _contiguous(arrays: dict) -> dict:
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def _previous(directory: Path) -> Path:
    """Where the checkpoint being replaced waits while its successor is renamed into place."""
    return directory.with_name(f".{directory.name}.old")


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def recover(directory) -> None:
    """Finish a swap that a kill interrupted: put ``.DIR.old`` back when DIR is missing, and
    remove the temporary folders of saves that never finished."""
    directory = Path(directory)
    old = _previous(directory)
    if not _is_complete(directory) and _is_complete(old):
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(old, directory)
    if directory.parent.is_dir():
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(directory, weights: dict, config: dict, state: dict | None = None,
                    optimizer: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (replacing an existing one).

    Args:
        weights: parameter name -> NumPy array (``model.state_dict()``).
        config: JSON-serialisable model and tokenizer description.
        state: JSON-serialisable training state (step, data position ...).
        optimizer: name -> NumPy array (``optimizer.state_dict()``).
    Raises CheckpointSaveError (an OSError) when the disk refuses; the previous checkpoint, if
    any, is then untouched.
    """
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint is a normal folder
    except OSError as error:
        raise CheckpointSaveError(f"could not save the checkpoint {directory} ({error}); the "
                                  "previous checkpoint, if any, is intact") from None
    try:
        save_file(_contiguous(weights), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if optimizer:
            save_file(_contiguous(optimizer), str(tmp / "optimizer.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=1))
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state))
        for file in tmp.iterdir():  # safetensors writes 0600 files; give them the umask's mode
            os.chmod(file, 0o666 & ~_umask())
        old = _previous(directory)
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)  # keep the previous one until the new one is in place
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise CheckpointSaveError(f"could not save the checkpoint {directory} ({error}); the "
                                      "previous checkpoint, if any, is intact") from None
        raise
    return directory


def write_json(path, value) -> None:
    """Write a JSON file atomically: a temporary file renamed over the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path, records) -> None:
    """Write one JSON object per line, atomically: a temporary file renamed over the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(tmp, path)


def read_jsonl(path) -> list[tuple]:
    """(record, "FILE, line N") for every non-blank line of a JSONL file; a line that is not
    JSON is an error naming it (what each record must hold is the caller's to check)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"{path}, line {number}"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    return records


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (line {error.lineno}, column "
                         f"{error.colno}: {error.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); the checkpoint "
                         "is corrupt or incomplete") from None


def find_checkpoint(directory) -> Path | None:
    """The complete checkpoint folder at ``directory``, or the previous one that an interrupted
    save left as ``.DIR.old``; None when there is neither."""
    directory = Path(directory)
    if _is_complete(directory):
        return directory
    if _is_complete(_previous(directory)):
        print(f"warning: {directory} is missing or incomplete (a save was interrupted); using "
              f"the previous checkpoint {_previous(directory)}", file=sys.stderr)
        return _previous(directory)
    return None


def is_checkpoint(directory) -> bool:
    """Whether ``directory`` holds a complete checkpoint (or its interrupted save left one)."""
    directory = Path(directory)
    return _is_complete(directory) or _is_complete(_previous(directory))


def load_checkpoint(directory) -> dict:
    """Read a checkpoint folder: {'weights', 'config', 'state', 'optimizer'} (the last two may
    be None)."""
    directory = Path(directory)
    found = find_checkpoint(directory)
    if found is None:
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
        missing = next(name for name in REQUIRED if not (directory / name).is_file())
        raise FileNotFoundError(f"{directory} is not a checkpoint: {missing} is missing")
    config = read_json(found / "config.json", "checkpoint config")
    if not isinstance(config, dict):
        raise ValueError(f"{found / 'config.json'} should hold a JSON object")
    state_path, optimizer_path = found / "state.json", found / "optimizer.safetensors"
    return {
        "weights": read_safetensors(found / "model.safetensors"),
        "config": config,
        "state": read_json(state_path, "training state") if state_path.is_file() else None,
        "optimizer": read_safetensors(optimizer_path) if optimizer_path.is_file() else None,
        "path": found,
    }
