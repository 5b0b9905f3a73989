"""Corpora larger than memory: stream documents from disk into the token files ``pretrain`` reads.

    documents (.txt / .jsonl / .gz) -> pieces of text -> ids, a batch at a time on every core
        -> appended to train.bin.tmp / val.bin.tmp -> renamed train.bin, val.bin, then meta.json

The output is the format of ``data.prepare_corpus``: flat arrays of uint16 ids (uint32 when the
vocabulary passes 2**16), each document followed by the end-of-text token, and meta.json (dtype,
vocab_size, tokenizer, val_fraction, train_tokens, val_tokens). Memory stays bounded: only a few
batches of text and their ids are held at once, whatever the size of the corpus.

Validation: with many documents, whole documents go to validation (a fixed pseudo-random choice,
about ``val_fraction`` of them); with few, the last ``val_fraction`` of every document, as
``prepare_corpus`` does.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import token_dtype
from .tokenizer import END_OF_TEXT, CharTokenizer, get_tokenizer, gpt2_encoding

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")  # what a folder is searched for
MANY_DOCUMENTS = 20      # from this many documents on, validation takes whole documents
PIECE_CHARS = 1 << 18    # a long document is tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 24    # characters tokenized together, spread over the workers (~16 M)
MOVE_BYTES = 1 << 24     # block size when moving a document's tail from train to validation


# ----------------------------------------------------------------------------- reading
def document_files(sources) -> list[Path]:
    """The files of a corpus: each file given, and every .txt / .jsonl (/ .gz) under each folder
    given (sorted), in the order given, without repeats."""
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.name.endswith(SUFFIXES) and f.is_file())
            if not found:
                raise FileNotFoundError(f"corpus folder {path} holds no {', '.join(SUFFIXES)} "
                                        "files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus {path} not found: give text or JSONL files, or "
                                    "folders of them")
    return list(dict.fromkeys(files))


def is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


@contextlib.contextmanager
def open_text(path: Path):
    """(text stream, raw file) of a UTF-8 file, gunzipped if it ends in .gz; the raw file's
    position is the bytes read so far. Undecodable input becomes a ValueError naming the file."""
    with open(path, "rb") as raw:
        stream = gzip.open(raw) if path.name.endswith(".gz") else raw
        try:
            yield io.TextIOWrapper(stream, encoding="utf-8"), raw
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text ({error.reason}); convert it to "
                             "UTF-8") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is not a complete gzip file ({error})") from None


def jsonl_texts(path: Path, lines):
    """The ``text`` field of every non-blank line of a JSONL file, with errors naming the line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path} line {number}: expected an object with a "text" string, '
                             'e.g. {"text": "..."}')
        yield record["text"]


def cut_point(text: str) -> int:
    """The last index ``i > 0`` where ``text[i]`` is a space or newline and ``text[i - 1]`` is not
    whitespace (0 if there is none).

    GPT-2's pre-tokenizer (tokenizer.GPT2_PATTERN) never makes a piece that runs from a
    non-space into whitespace, so it always starts a new piece there: ``text[:i]`` and
    ``text[i:]`` tokenize to exactly the two halves of ``text``'s tokens (characters could be cut
    anywhere).
    """
    for separator in ("\n", " "):
        i = text.rfind(separator)
        while i > 0:
            if not text[i - 1].isspace():
                return i
            i = text.rfind(separator, 0, i)
    return 0


MAX_PIECE_FACTOR = 8  # a text with no safe cut in this many pieces' length is cut anyway


def cut_pieces(chunks, piece_chars: int, max_chars: int | None = None):
    """Re-cut the chunks of one document into pieces of about ``piece_chars`` characters, each
    ending where tokenization is unaffected (``cut_point``). Yields (text, ends_document).

    A text with no space or newline for ``max_chars`` characters (default ``MAX_PIECE_FACTOR *
    piece_chars``: minified JSON, base64, a script written without spaces) is cut anyway, so
    memory stays bounded; the tokens at such a cut may differ from those of the uncut text."""
    max_chars = MAX_PIECE_FACTOR * piece_chars if max_chars is None else max_chars
    carry = ""
    for chunk in chunks:
        carry += chunk
        if len(carry) < piece_chars:
            continue
        cut = cut_point(carry)
        if not cut and len(carry) >= max_chars:
            cut = piece_chars  # no safe place for too long: bound the memory instead
        if cut:  # else no safe place yet: read on
            yield carry[:cut], False
            carry = carry[cut:]
    yield carry, True


def read_documents(files, piece_chars: int = PIECE_CHARS, progress=None):
    """(text, ends_document) pieces of every document of ``files`` in order: a text file is one
    document, a JSONL file one per line. ``progress`` (a tqdm bar) advances by bytes read."""
    done = 0  # bytes of the files before this one
    for path in files:
        with open_text(path) as (stream, raw):
            if is_jsonl(path):
                documents = ((text[i:i + piece_chars] for i in range(0, len(text), piece_chars))
                             for text in jsonl_texts(path, stream))
            else:
                documents = [iter(lambda: stream.read(piece_chars), "")]
            for chunks in documents:
                for piece in cut_pieces(chunks, piece_chars):
                    yield piece
                    if progress is not None:
                        progress.update(done + raw.tell() - progress.n)
        done += path.stat().st_size
        if progress is not None:
            progress.update(done - progress.n)


def count_documents(files, limit: int) -> int:
    """How many documents ``files`` hold, counting no further than ``limit`` (a quick look)."""
    count = 0
    for path in files:
        if count >= limit:
            break
        if not is_jsonl(path):
            count += 1
            continue
        with open_text(path) as (stream, _):
            for line in stream:
                count += bool(line.strip())
                if count >= limit:
                    break
    return count


def corpus_characters(files, piece_chars: int = PIECE_CHARS, progress=None) -> str:
    """Every character of the corpus, sorted: the vocabulary of a character tokenizer (a first
    streaming pass over the text, as ``CharTokenizer.from_text`` would see it)."""
    seen = set()
    for text, _ in read_documents(files, piece_chars, progress):
        seen.update(text)
    return "".join(sorted(seen))


# ---------------------------------------------------------------------------- encoding
def batch_encoder(tokenizer):
    """text -> 1-D uint32 array of ids, equal to ``tokenizer.encode(text)``, safe to run in
    several threads at once (both release the GIL for the heavy part)."""
    if tokenizer.name == "gpt2":
        encoding = gpt2_encoding()  # tiktoken's BPE runs in Rust, outside the GIL
        allowed = {END_OF_TEXT}      # as GPT2Tokenizer.encode: the text <|endoftext|> is 50256
        return lambda text: encoding.encode_to_numpy(text, allowed_special=allowed,
                                                     disallowed_special=())
    codes = np.array([ord(c) for c in tokenizer.chars], dtype=np.int64)
    table = np.full(codes.max(initial=0) + 1, -1, dtype=np.int64)  # code point -> id, -1: none
    table[codes] = np.arange(len(codes))

    def encode_characters(text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one per character
        ids = table[np.minimum(points, len(table) - 1)]
        unknown = (ids < 0) | (points >= len(table))
        if unknown.any():
            tokenizer.encode(text[int(np.argmax(unknown))])  # raises the tokenizer's own error
        return ids.astype(np.uint32)

    return encode_characters


def batches(pieces, batch_chars: int):
    """Lists of (text, ends_document) pieces of about ``batch_chars`` characters in all."""
    batch, size = [], 0
    for text, ends in pieces:
        batch.append((text, ends))
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded_pieces(pieces, encode, pool, batch_chars: int):
    """(ids, ends_document) of every piece in order. Each batch is handed to the pool's threads
    at once, and the next batch is read while they work on it."""
    pending = []
    for batch in batches(pieces, batch_chars):
        submitted = [(pool.submit(encode, text), ends) for text, ends in batch]
        for future, ends in pending:
            yield future.result(), ends
        pending = submitted
    for future, ends in pending:
        yield future.result(), ends


# ----------------------------------------------------------------------------- writing
def is_validation_document(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` goes to validation: a hash of the index drawn against
    ``val_fraction``, so the same corpus always splits the same way, in any order of reading."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


class SplitFiles:
    """``train.bin.tmp`` and ``val.bin.tmp``, open for appending ids, with their token counts."""

    def __init__(self, out_dir: Path, dtype):
        self.dtype = np.dtype(dtype)
        self.paths = {split: out_dir / f"{split}.bin.tmp" for split in ("train", "val")}
        self.files = {split: open(path, "w+b") for split, path in self.paths.items()}
        self.tokens = {"train": 0, "val": 0}

    def append(self, split: str, ids: np.ndarray) -> None:
        self.files[split].write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens[split] += len(ids)

    def move_tail(self, start: int) -> None:
        """Move the training tokens from token ``start`` on to the end of validation."""
        train, itemsize = self.files["train"], self.dtype.itemsize
        train.seek(start * itemsize)
        while block := train.read(MOVE_BYTES):
            self.files["val"].write(block)
        train.seek(start * itemsize)
        train.truncate()
        self.tokens["val"] += self.tokens["train"] - start
        self.tokens["train"] = start

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def prepare_tokens(sources, tokenizer_name: str, out_dir, val_fraction: float = 0.1,
                   workers: int | None = None, progress: bool = False,
                   batch_chars: int = BATCH_CHARS, piece_chars: int = PIECE_CHARS) -> dict:
    """Tokenize the documents of ``sources`` (files and folders) into ``out_dir``: train.bin,
    val.bin and meta.json, with memory bounded by ``batch_chars``, not by the corpus.

    ``tokenizer_name``: 'gpt2' or 'char' (its vocabulary from a first pass over the text);
    ``workers``: threads that tokenize (default: every core). Everything is written under
    temporary names and renamed at the end, meta.json last, so an interrupted run leaves
    nothing that looks finished. Returns the meta dict.
    """
    files = document_files(sources)
    total_bytes = sum(f.stat().st_size for f in files)
    workers = workers or os.cpu_count() or 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def bar(description):
        return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=description, disable=not progress)

    if tokenizer_name == "char":
        with bar("characters") as reading:
            tokenizer = CharTokenizer(corpus_characters(files, piece_chars, reading))
    else:
        tokenizer = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tokenizer.vocab_size)
    separator = np.array([] if tokenizer.eot_token is None else [tokenizer.eot_token], dtype)
    by_document = count_documents(files, MANY_DOCUMENTS) >= MANY_DOCUMENTS

    splits = SplitFiles(out_dir, dtype)
    meta_tmp = out_dir / "meta.json.tmp"
    try:
        document, start, previous_start = 0, 0, 0  # the document being read; starts in train
        with ThreadPoolExecutor(workers) as pool, bar("tokenizing") as reading:
            pieces = read_documents(files, piece_chars, progress=reading)
            for ids, ends_document in encoded_pieces(pieces, batch_encoder(tokenizer), pool,
                                                     batch_chars):
                whole_to_val = by_document and is_validation_document(document, val_fraction)
                split = "val" if whole_to_val else "train"
                splits.append(split, ids)
                if not ends_document:
                    continue
                if not by_document:  # the document's last val_fraction, as prepare_corpus
                    length = splits.tokens["train"] - start
                    cut = start + int(length * (1 - val_fraction))
                    if cut < splits.tokens["train"]:
                        splits.move_tail(cut)
                        splits.append("val", separator)
                splits.append(split, separator)
                document, previous_start, start = document + 1, start, splits.tokens["train"]
        if document == 0:
            raise ValueError(f"the corpus {', '.join(map(str, sources))} holds no documents")
        if by_document and splits.tokens["val"] == 0:  # no document drew validation:
            splits.move_tail(previous_start)                # the last one goes there
        splits.close()
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": tokenizer.to_config(), "val_fraction": val_fraction,
                "train_tokens": splits.tokens["train"], "val_tokens": splits.tokens["val"],
                "documents": document, "split": "documents" if by_document else "tail",
                "sources": [str(s) for s in sources], "files": len(files), "bytes": total_bytes}
        meta_tmp.write_text(json.dumps(meta, indent=1))
    except BaseException:
        splits.close()
        for path in (*splits.paths.values(), meta_tmp):
            path.unlink(missing_ok=True)
        raise
    (out_dir / "meta.json").unlink(missing_ok=True)  # an older prepare stops being complete
    for split, path in splits.paths.items():
        os.replace(path, out_dir / f"{split}.bin")
    os.replace(meta_tmp, out_dir / "meta.json")
    return meta


# ----------------------------------------------------------------------------- reading back
META_FIELDS = ("dtype", "vocab_size", "tokenizer", "val_fraction", "train_tokens", "val_tokens")


def load_prepared(folder) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, train ids, validation ids) of a folder written by ``prepare_tokens``; the ids are
    read-only memmaps, never loaded whole. A missing, unfinished or damaged folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokens folder {folder} not found: make it with "
                                "`tinygrad-llm prepare --out DIR`")
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise ValueError(f"{folder} holds no meta.json: not a finished `tinygrad-llm prepare` "
                         "(an interrupted one leaves only .tmp files); run prepare again")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{meta_path} is not valid JSON; run prepare again") from None
    missing = [k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)}: not written by "
                         "`tinygrad-llm prepare`")
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for split in ("train", "val"):
        path, expected = folder / f"{split}.bin", meta[f"{split}_tokens"]
        size = path.stat().st_size if path.exists() else -1
        if size != expected * dtype.itemsize:
            found = "is missing" if size < 0 else f"holds {size // dtype.itemsize:,} tokens"
            raise ValueError(f"{path} {found}, meta.json says {expected:,}: the folder is "
                             "damaged; run prepare again")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if expected
                      else np.zeros(0, dtype))  # an empty file cannot be memory-mapped
    return meta, arrays[0], arrays[1]
