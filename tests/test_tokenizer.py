"""Tokenizers: GPT-2's known ids, round trips, unknown words, characters, config round trips."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm.data import SHAKESPEARE, read_corpus
from tinygrad_llm.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    bpe_steps,
    get_tokenizer,
    learn_bpe,
    tokenizer_from_config,
)


def test_gpt2_known_ids():
    tokenizer = GPT2Tokenizer()
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256] == [tokenizer.eot_token]
    assert tokenizer.vocab_size == 50257


def test_gpt2_splits_unknown_words_into_subwords_and_round_trips():
    tokenizer = GPT2Tokenizer()
    word = " Akwirw ier"  # not a word: must become several sub-word tokens
    ids = tokenizer.encode(word)
    assert len(ids) > 2
    assert tokenizer.decode(ids) == word
    text = "It's 2026; naïve café — 日本語 works\n\n  too.<|endoftext|>next"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_made_up_words_become_the_six_pieces_docs_show():
    tokenizer = GPT2Tokenizer()  # docs/tokenization.md: " ier" is one piece but not one token
    ids = tokenizer.encode("Akwirw ier")
    assert ids == [33901, 86, 343, 86, 220, 959]
    assert [tokenizer.decode([i]) for i in ids] == ["Ak", "w", "ir", "w", " ", "ier"]


def test_gpt2_special_token_can_be_kept_as_text():
    tokenizer = GPT2Tokenizer()
    assert 50256 not in tokenizer.encode("<|endoftext|>", allow_special=False)


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.vocab_size == len(set("hello world"))
    assert tokenizer.decode(tokenizer.encode("low held")) == "low held"
    assert tokenizer.encode(" ") == [0]  # sorted: space first
    with pytest.raises(ValueError, match="'z' is not in"):
        tokenizer.encode("zoo")


def test_shakespeare_characters_include_z_but_not_hash():
    tokenizer = CharTokenizer.from_text("".join(read_corpus(SHAKESPEARE)))
    assert tokenizer.vocab_size == 84
    assert tokenizer.decode(tokenizer.encode("Zounds")) == "Zounds"
    with pytest.raises(ValueError, match="'#' is not in"):
        tokenizer.encode("#")


@pytest.mark.parametrize("tokenizer", [GPT2Tokenizer(), CharTokenizer.from_text("abc\n")])
def test_tokenizers_rebuild_from_their_config(tokenizer):
    rebuilt = tokenizer_from_config(tokenizer.to_config())
    assert rebuilt.encode("abc\ncab") == tokenizer.encode("abc\ncab")


def test_unknown_tokenizer_names_are_refused():
    with pytest.raises(ValueError, match="choose 'gpt2' or 'char'"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_config({"type": "bpe"})


# ------------------------------------------------------------- byte-pair encoding by hand
@settings(max_examples=60)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_the_slow_bpe_loop_gives_tiktokens_ids(text):
    from tinygrad_llm.tokenizer import bpe_encode

    assert bpe_encode(text) == GPT2Tokenizer().encode(text, allow_special=False)


def test_bpe_steps_merge_the_lowest_rank_first():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    steps = bpe_steps("abc", ranks)
    # bc (rank 3) is merged before ab (rank 4); then a + bc = abc (rank 5)
    assert [s[0] for s in steps] == [[b"a", b"b", b"c"], [b"a", b"bc"], [b"abc"]]
    assert [s[2] for s in steps] == [3, 5, None]


def test_learn_bpe_merges_the_most_frequent_pair_each_time():
    # the classic example: aaabdaaabac; pairs aa (4, overlapping), ab (2) ...
    merges = learn_bpe("aaabdaaabac", 3)
    assert merges[0] == (b"a", b"a")
    # an independent recount after each merge: each learned pair was the most frequent then
    tokens = [bytes([c]) for c in b"aaabdaaabac"]
    for pair in merges:
        counts = {}
        for p in zip(tokens, tokens[1:], strict=False):
            counts[p] = counts.get(p, 0) + 1
        assert counts[pair] == max(counts.values())
        merged, i = [], 0
        while i < len(tokens):
            if tuple(tokens[i:i + 2]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        tokens = merged
    assert tokens == [b"aaab", b"d", b"aaab", b"a", b"c"]
