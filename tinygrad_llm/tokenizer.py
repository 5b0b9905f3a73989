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


# ------------------------------------------------------------- byte-pair encoding by hand
# tiktoken runs the merge loop (in Rust). The functions below run the same algorithm in plain
# Python, slowly, to show what it does: tests check they give tiktoken's ids.
@functools.lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's vocabulary: byte string -> rank (= token id). The 256 single bytes come first,
    then the merged pairs in the order they were learned: a lower rank was a more frequent pair."""
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(GPT2_RANKS))


def split_pieces(text: str) -> list[str]:
    """Pre-tokenization: ``text`` cut by GPT2_PATTERN. A merge never crosses two pieces."""
    import regex  # tiktoken's own dependency: Python's re has no \\p{L}

    return regex.findall(GPT2_PATTERN, text)


def bpe_steps(piece: str, ranks: dict | None = None) -> list[tuple]:
    """Encode one piece step by step: [(parts, pair merged next, its rank)], the last entry
    (final parts, None, None). ``parts`` are the current tokens as byte strings.

    Start from the piece's bytes; at each step merge the adjacent pair whose concatenation has
    the lowest rank (the leftmost such pair), until no adjacent pair is in the vocabulary.
    """
    ranks = gpt2_ranks() if ranks is None else ranks
    parts = [bytes([b]) for b in piece.encode("utf-8")]
    steps = []
    while True:
        pairs = zip(parts, parts[1:], strict=False)  # (parts[i], parts[i + 1])
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(pairs) if a + b in ranks]
        if not candidates:
            steps.append((parts, None, None))
            return steps
        rank, i = min(candidates)  # lowest rank; on a tie the leftmost
        steps.append((parts, (parts[i], parts[i + 1]), rank))
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def bpe_encode(text: str) -> list[int]:
    """GPT-2 ids of ``text`` by the slow loop above (no special tokens): tiktoken's result."""
    ranks = gpt2_ranks()
    return [ranks[part] for piece in split_pieces(text) for part in bpe_steps(piece, ranks)[-1][0]]


def learn_bpe(text: str, num_merges: int) -> list[tuple[bytes, bytes]]:
    """Learn merges as GPT-2's were learned, on a toy scale: count every adjacent pair of tokens
    inside the pieces of ``text`` (bytes at first), merge the most frequent pair everywhere (on a
    tie: the pair seen first), repeat. Returns the merges in order: merge n gets rank 256 + n."""
    words = {}  # each distinct piece as a tuple of tokens -> how often it occurs
    for piece in split_pieces(text):
        key = tuple(bytes([b]) for b in piece.encode("utf-8"))
        words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(num_merges):
        counts = {}  # dicts keep insertion order: the first pair seen wins a tie
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break  # every piece is a single token
        best = max(counts, key=counts.get)
        merges.append(best)
        merged = {}
        for word, n in words.items():
            tokens, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    tokens.append(best[0] + best[1])
                    i += 2
                else:
                    tokens.append(word[i])
                    i += 1
            merged[tuple(tokens)] = merged.get(tuple(tokens), 0) + n
        words = merged
    return merges
