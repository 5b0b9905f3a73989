"""Tokenizers: GPT-2's known ids, round trips, unknown words, characters, config round trips."""

import pytest

from tinygrad_llm.data import SHAKESPEARE, read_corpus
from tinygrad_llm.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    get_tokenizer,
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
