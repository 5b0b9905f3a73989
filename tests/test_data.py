"""Corpus -> token files -> windows -> batches."""

import numpy as np
import pytest

from tinygrad_llm.data import (
    SHAKESPEARE,
    DataLoader,
    RandomWindows,
    SlidingWindowDataset,
    cached_token_files,
    corpus_files,
    load_tokens,
    prepare_corpus,
    read_corpus,
)
from tinygrad_llm.tokenizer import CharTokenizer, GPT2Tokenizer


def test_bundled_shakespeare_is_there():
    files = corpus_files(SHAKESPEARE)
    assert len(files) == 42
    assert "HAMLET" in (SHAKESPEARE / "hamlet.txt").read_text()[:100]


def test_prepare_corpus_splits_every_document_and_uses_uint16(tmp_path):
    documents = ["a" * 100, "b" * 50]
    tokenizer = CharTokenizer.from_text("ab")
    meta = prepare_corpus(documents, tokenizer, tmp_path, val_fraction=0.1)
    train = load_tokens(tmp_path / "train.bin", meta["dtype"])
    val = load_tokens(tmp_path / "val.bin", meta["dtype"])
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    assert list(train) == [0] * 90 + [1] * 45
    assert list(val) == [0] * 10 + [1] * 5


def test_gpt2_corpus_separates_documents_with_end_of_text(tmp_path):
    meta = prepare_corpus(["Hello, world", "Hi"], GPT2Tokenizer(), tmp_path, val_fraction=0.0)
    train = load_tokens(tmp_path / "train.bin", meta["dtype"])
    assert list(train) == [15496, 11, 995, 50256, 17250, 50256]


def test_document_separators_reach_both_splits(tmp_path):
    text = "To be, or not to be, that is the question. " * 20
    meta = prepare_corpus([text, text], GPT2Tokenizer(), tmp_path, val_fraction=0.1)
    for split in ("train", "val"):
        tokens = load_tokens(tmp_path / f"{split}.bin", meta["dtype"])
        assert list(tokens).count(50256) == 2, split  # each document's part ends with one
        assert tokens[-1] == 50256


def test_cached_tokens_are_rebuilt_when_what_built_them_changes(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)
    tokenizer = CharTokenizer.from_text("abcdefghij")
    train, val = cached_token_files(corpus, tokenizer, tmp_path / "data", val_fraction=0.1)
    assert (len(train), len(val)) == (900, 100) and "tokenizing" in capsys.readouterr().err
    cached_token_files(corpus, tokenizer, tmp_path / "data", val_fraction=0.1)
    assert "tokenizing" not in capsys.readouterr().err  # reused
    train, val = cached_token_files(corpus, tokenizer, tmp_path / "data", val_fraction=0.2)
    assert (len(train), len(val)) == (800, 200)  # another split: rebuilt, not silently reused


def test_missing_or_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        read_corpus(tmp_path)


def test_sliding_window_targets_are_inputs_shifted_by_one():
    tokens = np.arange(20)
    dataset = SlidingWindowDataset(tokens, context_length=4, stride=2)
    x, y = dataset[1]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]
    assert len(dataset) == len(range(0, 20 - 4, 2))
    assert SlidingWindowDataset(tokens, 4)[1][0].tolist() == [4, 5, 6, 7]  # stride defaults to T


def test_loader_batches_shuffle_with_a_seed_and_drop_the_last():
    dataset = SlidingWindowDataset(np.arange(100), context_length=4)  # 24 windows
    loader = DataLoader(dataset, batch_size=5, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert batches[0][0].shape == (5, 4) and batches[0][0].dtype == np.int64
    again = list(DataLoader(dataset, batch_size=5, seed=3))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert not np.array_equal(list(loader)[0][0], batches[0][0])  # a new order next epoch
    keep_last = DataLoader(dataset, batch_size=5, shuffle=False, drop_last=False)
    assert len(list(keep_last)) == 5 and list(keep_last)[-1][0].shape == (4, 4)


def test_random_windows_resume_from_their_state():
    windows = RandomWindows(np.arange(1000), context_length=8, batch_size=3, seed=0)
    x, y = windows.next_batch()
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.all(y - x == 1)
    state = windows.state()
    expected = windows.next_batch()
    other = RandomWindows(np.arange(1000), context_length=8, batch_size=3, seed=99)
    other.load_state(state)
    assert np.array_equal(other.next_batch()[0], expected[0])
    with pytest.raises(ValueError, match="too few"):
        RandomWindows(np.arange(5), context_length=8, batch_size=1)
