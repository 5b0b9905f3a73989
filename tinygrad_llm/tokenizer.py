"""Tokenizers: GPT-2 byte-pair encoding (through tiktoken, from vendored ranks) and characters.

Both turn text into a list of integer ids and back, and describe themselves as a small dict
(``to_config``) that checkpoints store in ``config.json``; ``tokenizer_from_config`` rebuilds them.
"""

from __future__ import annotations

import functools
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
END_OF_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenization: contractions, runs of letters, of digits, of other symbols (each with
# an optional leading space), and whitespace. BPE merges only ever happen inside one such piece.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The tiktoken Encoding for GPT-2, built from the vendored ranks (never downloads)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(GPT2_RANKS)),
        special_tokens={END_OF_TEXT: 50256},
    )


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: 50,257 tokens, any text round-trips, 50256 is end-of-text."""

    name = "gpt2"
    vocab_size = 50257
    eot_token = 50256

    def __init__(self):
        self._encoding = gpt2_encoding()

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of ``text``; ``<|endoftext|>`` becomes 50256 unless ``allow_special=False``."""
        allowed = {END_OF_TEXT} if allow_special else set()
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def to_config(self) -> dict:
        return {"type": "gpt2"}


class CharTokenizer:
    """One id per character, the characters of a corpus in sorted order."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the character list has duplicates")
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as error:
            raise ValueError(
                f"character {error.args[0]!r} is not in this character tokenizer's vocabulary "
                f"({self.vocab_size} characters, built from the training corpus)"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_config(self) -> dict:
        return {"type": "char", "chars": self.chars}


def tokenizer_from_config(config: dict):
    """Rebuild a tokenizer from what ``to_config`` returned (stored in a checkpoint)."""
    kind = config.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(config["chars"])
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'gpt2' or 'char'")


def get_tokenizer(name: str, text: str | None = None):
    """'gpt2', or 'char' (built from ``text``)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if text is None:
            raise ValueError("a character tokenizer is built from a corpus: pass its text")
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'gpt2' or 'char'")
