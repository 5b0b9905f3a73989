"""`tinygrad-llm prepare`: corpora streamed into token files, checked against the tokenizers."""

import gzip
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import prepare
from tinygrad_llm.prepare import cut_pieces, load_prepared, prepare_tokens
from tinygrad_llm.tokenizer import CharTokenizer, GPT2Tokenizer
from tinygrad_llm.train.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16",
        "--batch-size", "2", "--steps", "2", "--eval-interval", "2", "--eval-batches", "1",
        "--sample-tokens", "0", "--warmup", "1", "--quiet"]
# whitespace runs, trailing spaces, contractions, digits, symbols, the end-of-text text, non-ASCII
TRICKY = ("It's  the 2nd  time\n\n  she'll say: 'no!!'   \n\t<|endoftext|> naïve café 1234567 "
          "tabs\t\tand\r\nnew lines   \n\n\n")
SMALL = {"piece_chars": 40, "batch_chars": 200}  # many pieces and batches even for short texts


def tokenizer_of(name, texts):
    return GPT2Tokenizer() if name == "gpt2" else CharTokenizer.from_text("".join(texts))


def ids_and_separator(tokenizer, text):
    return tokenizer.encode(text) + ([] if tokenizer.eot_token is None else [tokenizer.eot_token])


def tail_split(tokenizer, texts, val_fraction):
    """The reference for few documents: the last val_fraction of each in validation."""
    train, val = [], []
    separator = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    for text in texts:
        ids = tokenizer.encode(text)
        cut = int(len(ids) * (1 - val_fraction))
        train += ids[:cut] + separator
        if cut < len(ids):
            val += ids[cut:] + separator
    return train, val


def read_back(folder):
    meta, train, val = load_prepared(folder)
    return meta, train.tolist(), val.tolist()


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_few_documents_split_by_the_tail_of_each(tmp_path, name):
    texts = [TRICKY * 3, "a short one", TRICKY.upper() * 5]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8", newline="")
    meta, train, val = read_back_after(tmp_path, name, val_fraction=0.2)
    reference = tokenizer_of(name, [t.replace("\r\n", "\n") for t in texts])  # read as text
    expected_train, expected_val = tail_split(reference, [t.replace("\r\n", "\n") for t in texts],
                                              0.2)
    assert (train, val) == (expected_train, expected_val)
    assert meta["split"] == "tail" and meta["documents"] == 3
    assert meta["tokenizer"] == reference.to_config() and meta["dtype"] == "uint16"


def read_back_after(tmp_path, name, val_fraction, **settings):
    out = tmp_path / "tokens"
    prepare_tokens(sorted(tmp_path.glob("doc*")), name, out, val_fraction,
                   **{**SMALL, **settings})
    return read_back(out)


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_many_documents_go_to_validation_whole(tmp_path, name):
    texts = [f"document {i}: " + TRICKY * (i % 4 + 1) for i in range(40)]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as file:
        for text in texts:
            file.write(json.dumps({"text": text, "id": 7}) + "\n\n")  # blank lines are skipped
    prepare_tokens([tmp_path / "docs.jsonl"], name, tmp_path / "a", 0.25, **SMALL)
    meta, train, val = read_back(tmp_path / "a")
    tokenizer = tokenizer_of(name, texts)
    in_val = []
    for text in texts:  # each document, in order, is the next stretch of one of the splits
        ids = ids_and_separator(tokenizer, text)
        if train[:len(ids)] == ids:
            train = train[len(ids):]
            in_val.append(False)
        else:
            assert val[:len(ids)] == ids
            val = val[len(ids):]
            in_val.append(True)
    assert train == [] and val == []
    assert 2 <= sum(in_val) <= 20 and meta["split"] == "documents" and meta["documents"] == 40
    prepare_tokens([tmp_path / "docs.jsonl"], name, tmp_path / "b", 0.25)
    assert read_back(tmp_path / "b")[1:] == read_back(tmp_path / "a")[1:]  # whatever the batches


def test_reads_txt_jsonl_and_gz_recursively(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("plain text file\n")
    (corpus / "b.jsonl").write_text('{"text": "line one"}\n{"text": "line two"}\n')
    with gzip.open(corpus / "c.txt.gz", "wt", encoding="utf-8") as file:
        file.write("gzipped text " * 50)
    with gzip.open(corpus / "d.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write('{"text": "gzipped json"}\n')
    (corpus / "sub" / "e.txt").write_text("nested folder")
    (corpus / "notes.md").write_text("not part of the corpus")
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "tokens"),
                 "--val-fraction", "0.5", "--quiet"]) == 0
    _, train, val = read_back(tmp_path / "tokens")
    texts = ["plain text file\n", "line one", "line two", "gzipped text " * 50, "gzipped json",
             "nested folder"]
    assert (train, val) == tail_split(GPT2Tokenizer(), texts, 0.5)


def test_ids_past_65536_are_stored_as_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000))  # 70,000 distinct characters
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    meta, train, val = read_back_after(tmp_path, "char", 0.1, piece_chars=1000,
                                       batch_chars=5000)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert train + val == list(range(70_000))


@given(st.text(alphabet=list(" \n\t\r\u00a0\u2028a1'sé!<|>"), max_size=200),
       st.integers(1, 30))
def test_pieces_tokenize_like_the_whole_text(text, piece_chars):
    encode = GPT2Tokenizer().encode
    chunks = (text[i:i + 7] for i in range(0, len(text), 7))
    pieces = [piece for piece, _ in cut_pieces(chunks, piece_chars, max_chars=10**9)]
    assert "".join(pieces) == text  # (no forced cut: that one is tested below)
    assert sum((encode(piece) for piece in pieces), []) == encode(text)


def test_bad_input_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    assert main(["prepare", "--data", str(bad), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert f"{bad} line 3: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    assert main(["prepare", "--data", str(bad), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert f'{bad} line 2: expected an object with a "text" string' in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    assert main(["prepare", "--data", str(latin), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert f"{latin} is not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "t" / "meta.json").exists()


def test_an_interrupted_prepare_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(TRICKY * 20)
    out = tmp_path / "tokens"
    original, calls = prepare.SplitFiles.append, []

    def failing_append(self, split, ids):
        calls.append(split)
        if len(calls) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way
        original(self, split, ids)

    monkeypatch.setattr(prepare.SplitFiles, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(sorted(tmp_path.glob("doc*")), "gpt2", out, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == []  # no meta.json, no .tmp, no .bin
    monkeypatch.setattr(prepare.SplitFiles, "append", original)
    assert main(["prepare", "--data", *map(str, sorted(tmp_path.glob("doc*"))), "--out", str(out),
                 "--quiet"]) == 0
    finished = read_back(out)
    monkeypatch.setattr(prepare.SplitFiles, "append", failing_append)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # an interrupted --overwrite keeps the old one whole
        prepare_tokens(sorted(tmp_path.glob("doc*")), "char", out, **SMALL)
    assert read_back(out) == finished


def test_a_finished_folder_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(TRICKY)
    command = ["prepare", "--data", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "t"),
               "--quiet"]
    assert main(command) == 0
    assert main(command) == 2
    assert "already holds a prepared corpus" in capsys.readouterr().err
    assert main([*command, "--tokenizer", "char", "--overwrite"]) == 0
    assert read_back(tmp_path / "t")[0]["tokenizer"]["type"] == "char"


def peak_allocation(tmp_path, name, documents, chars_per_document):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(documents):
        (folder / f"doc{i:03d}.txt").write_text((TRICKY * 100_000)[:chars_per_document])
    tracemalloc.start()
    try:
        prepare_tokens([folder], "char", tmp_path / f"{name}-tokens", batch_chars=1 << 14,
                       piece_chars=1 << 12)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
    small = peak_allocation(tmp_path, "small", 25, 8_000)      # 0.2 MB of text
    large = peak_allocation(tmp_path, "large", 25, 160_000)    # 4 MB: 8 MB of uint16 ids
    assert large < 1_000_000  # far below the corpus, its ids, or one document's ids
    assert large < small + 300_000  # 20 times the text, no more memory (small's peak includes
    #                                 the first call's one-time set-up)


def test_pretrain_trains_on_a_prepared_folder_and_resumes(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tokens, run = tmp_path / "tokens", tmp_path / "run"
    assert main(["prepare", "--data", str(corpus), "--tokenizer", "char", "--out", str(tokens),
                 "--quiet"]) == 0
    assert main(["pretrain", "--tokens", str(tokens), "--out", str(run), *TINY]) == 0
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["tokenizer"] == load_prepared(tokens)[0]["tokenizer"]
    assert not (run / "data").exists()  # nothing tokenized again
    assert main(["pretrain", "--out", str(run), "--resume", *TINY, "--steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    capsys.readouterr()
    (tokens / "meta.json").unlink()  # an unfinished folder: one line, no traceback
    assert main(["pretrain", "--tokens", str(tokens), "--out", str(tmp_path / "r2"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no meta.json" in err and len(err.splitlines()) == 1


def test_pretrain_refuses_flags_that_contradict_the_prepared_folder(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("pack my box with five dozen liquor jugs! " * 40)
    tokens = tmp_path / "tokens"
    main(["prepare", "--data", str(tmp_path / "c.txt"), "--tokenizer", "char", "--out",
          str(tokens), "--quiet"])
    capsys.readouterr()
    for flags, message in ((["--tokenizer", "gpt2"], "prepared with the 'char' tokenizer"),
                           (["--val-fraction", "0.3"], "was made by `prepare`")):
        assert main(["pretrain", "--tokens", str(tokens), "--out", str(tmp_path / "r"), *flags,
                     *TINY]) == 2
        assert message in capsys.readouterr().err
    np.zeros(3, np.uint16).tofile(tokens / "val.bin")  # damaged: sizes disagree with meta.json
    assert main(["pretrain", "--tokens", str(tokens), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "the folder is damaged" in capsys.readouterr().err


def test_a_text_without_spaces_is_still_cut_so_memory_stays_bounded():
    from tinygrad_llm.prepare import MAX_PIECE_FACTOR, cut_pieces

    chunks = ["x" * 100] * 200  # 20,000 characters and no safe place to cut
    pieces = list(cut_pieces(chunks, piece_chars=100))
    assert "".join(text for text, _ in pieces) == "x" * 20_000
    assert max(len(text) for text, _ in pieces) <= MAX_PIECE_FACTOR * 100
    assert [end for _, end in pieces][-1] is True
