"""From text to batches: corpus files -> token files on disk -> windows -> batches of (B, T) ids.

A model learns to predict token t+1 from tokens 0..t, so every training example is a window of
``context_length`` ids and the same window shifted one to the right as its targets:

    tokens   In the beginning was the word
    inputs   [In  the  beginning  was ]
    targets  [the beginning  was  the ]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

SHAKESPEARE = Path(__file__).parent / "assets" / "shakespeare"


def corpus_files(source) -> list[Path]:
    """The ``.txt`` files of a folder (sorted), or the one file given."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus folder {path} holds no .txt files")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"corpus {path} not found: give a text file or a folder of .txt files")


def read_corpus(source) -> list[str]:
    """The documents of a corpus, one string per file (UTF-8)."""
    documents = []
    for file in corpus_files(source):
        try:
            documents.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{file} is not UTF-8 text ({error})") from None
    return documents


def token_dtype(vocab_size: int):
    """uint16 when every id fits (GPT-2's 50,257 do), else uint32: half the disk and memory."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare_corpus(documents: list[str], tokenizer, out_dir, val_fraction: float = 0.1) -> dict:
    """Tokenize documents into ``out_dir/train.bin`` and ``val.bin`` and describe them in meta.json.

    The last ``val_fraction`` of every document goes to validation, so both splits cover every
    work. With a tokenizer that has an end-of-text token, each document's part in each split
    ends with it, so neither split runs one document into the next. Returns the meta dict
    (paths, counts, dtype).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    separator = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    train_parts, val_parts = [], []
    for text in documents:
        ids = tokenizer.encode(text)
        cut = int(len(ids) * (1 - val_fraction))
        train_parts.append(np.asarray(ids[:cut] + separator, dtype=dtype))
        if cut < len(ids):
            val_parts.append(np.asarray(ids[cut:] + separator, dtype=dtype))
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.to_config(), "val_fraction": val_fraction}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
        path = out_dir / f"{split}.bin"
        tmp = path.with_suffix(".bin.tmp")
        tokens.tofile(tmp)
        os.replace(tmp, path)
        meta[f"{split}_tokens"] = int(tokens.size)
    return meta


def corpus_fingerprint(source) -> list:
    """Names, sizes and modification times: a cheap test that cached tokens are still current."""
    return [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in corpus_files(source)]


def cached_token_files(source, tokenizer, data_dir, val_fraction: float = 0.1) -> tuple:
    """(train tokens, validation tokens) of a corpus, tokenized into ``data_dir`` once.

    The files are reused only while everything that built them is the same -- the corpus files
    (names, sizes, times), the tokenizer and the validation fraction -- and rebuilt otherwise.
    meta.json is written last, so an interrupted build is never mistaken for a finished one.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    built_from = {"tokenizer": tokenizer.to_config(), "corpus": corpus_fingerprint(source),
                  "val_fraction": val_fraction}
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}  # damaged: rebuild
    if {k: meta.get(k) for k in built_from} != built_from:
        print(f"tokenizing {source} ...", file=sys.stderr)
        meta_path.unlink(missing_ok=True)
        meta = {**prepare_corpus(read_corpus(source), tokenizer, data_dir, val_fraction),
                **built_from}
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
    return (load_tokens(data_dir / "train.bin", meta["dtype"]),
            load_tokens(data_dir / "val.bin", meta["dtype"]))


def load_tokens(path, dtype="uint16") -> np.ndarray:
    """A token file as a read-only memmap: the corpus never has to fit in memory."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


class SlidingWindowDataset:
    """Windows of ``context_length`` ids every ``stride`` tokens, with targets shifted by one.

    The teaching version (the book's ``GPTDatasetV1``): every window listed up front, read in
    order or shuffled by ``DataLoader``. Training uses ``RandomWindows``, which draws windows at
    random offsets and needs no list, for corpora of any size.

    ``stride == context_length`` tiles the text without overlap; a smaller stride overlaps.
    """

    def __init__(self, tokens, context_length: int, stride: int | None = None):
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride or context_length
        if len(tokens) < context_length + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of "
                             f"{context_length} (+1 for the targets)")
        self.starts = np.arange(0, len(tokens) - context_length, self.stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.starts[index]
        chunk = np.asarray(self.tokens[start:start + self.context_length + 1], dtype=np.int64)
        return chunk[:-1], chunk[1:]  # inputs (T,), targets (T,)


class DataLoader:
    """Batches of a dataset: (inputs (B, T), targets (B, T)), shuffled per epoch with a seed
    (the teaching companion of ``SlidingWindowDataset``; see ``RandomWindows``)."""

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self):
        order = np.arange(len(self.dataset))
        if self.shuffle:  # a new order each epoch, the same for the same seed and epoch
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            if len(indices) < self.batch_size and self.drop_last:
                break
            pairs = [self.dataset[i] for i in indices]
            yield np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class RandomWindows:
    """Batches of windows at random offsets (nanoGPT's ``get_batch``) for large corpora.

    Its generator state goes into checkpoints (``state`` / ``load_state``), so a resumed run
    draws exactly the batches the interrupted one would have.
    """

    def __init__(self, tokens, context_length: int, batch_size: int, seed: int = 0):
        if len(tokens) < context_length + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of "
                             f"{context_length} (+1 for the targets); use a smaller context")
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (B, T), targets (B, T)) as int64."""
        starts = self.rng.integers(0, len(self.tokens) - self.context_length, self.batch_size)
        offsets = np.arange(self.context_length + 1)
        chunk = np.asarray(self.tokens[starts[:, None] + offsets], dtype=np.int64)  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
