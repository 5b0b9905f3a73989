"""The `tinygrad-llm` command end to end on a tiny corpus: train, resume, continue, generate."""

import json

import pytest

from tinygrad_llm.train.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16",
        "--batch-size", "2", "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "5",
        "--warmup", "1", "--quiet"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    (folder / "b.txt").write_text("pack my box with five dozen liquor jugs! " * 30)
    return folder


def test_pretrain_resume_and_generate(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--steps", "4", *TINY]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--steps", "6", "--resume",
                 *TINY]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "the",
                 "--max-new-tokens", "7", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("the") and len(text) == 3 + 7


def test_continued_pretraining_starts_from_a_model(tmp_path, corpus):
    base = tmp_path / "base"
    main(["pretrain", "--data", str(corpus), "--out", str(base), "--steps", "2", *TINY])
    more = tmp_path / "more.txt"
    more.write_text("the lazy dog jumps over the quick brown fox. " * 30)
    assert main(["pretrain", "--data", str(more), "--out", str(tmp_path / "more"), "--steps", "2",
                 "--init-from", str(base / "checkpoint"), *TINY]) == 0
    config = json.loads((tmp_path / "more" / "checkpoint" / "config.json").read_text())
    assert config["model"]["n_embd"] == 16


def test_clear_errors(tmp_path, corpus, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                 *TINY]) == 2
    assert "not found" in capsys.readouterr().err
    out = tmp_path / "run"
    main(["pretrain", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY])
    capsys.readouterr()
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--steps", "4", "--resume",
                 "--tokenizer", "gpt2", *TINY]) == 2
    assert "--tokenizer gpt2 (the run has char)" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "empty"), "--resume", *TINY]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    unknown = tmp_path / "other.txt"
    unknown.write_text("ZZZ only capitals here " * 20)
    assert main(["pretrain", "--data", str(unknown), "--out", str(tmp_path / "y"), "--steps", "2",
                 "--init-from", str(out / "checkpoint"), *TINY]) == 2
    assert "not in this character tokenizer's vocabulary" in capsys.readouterr().err
