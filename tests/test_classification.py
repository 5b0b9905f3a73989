"""Classification finetuning: data loading and its errors, splits, padding invariance,
trainable-layer choices, metrics, learning, checkpoints and the commands."""

import json

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend
from tinygrad_llm.finetune.classification import (
    SPAM_DATA,
    ClassifierConfig,
    GPTClassifier,
    balance,
    classification_metrics,
    encode,
    evaluate,
    load_classifier,
    pad_batch,
    read_labeled,
    resolve_trainable,
    save_classifier,
    stratified_split,
    train_classifier,
)
from tinygrad_llm.loading import save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer
from tinygrad_llm.train.cli import main

CHARS = CharTokenizer(" abcdefghijklmnopqrstuvwxyz")


def tiny_gpt(seed=0):
    backend.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=CHARS.vocab_size, context_length=24, n_layer=2, n_head=2,
                         n_embd=16))


# ------------------------------------------------------------------------------ data files
def test_bundled_sms_file_reads_by_column_position():
    rows = read_labeled(SPAM_DATA, text_column=1, label_column=0)
    assert len(rows) == 5574
    assert rows[0] == ("Go until jurong point, crazy.. Available only in bugis n great world la e "
                       "buffet... Cine there got amore wat...", "ham")
    assert sum(label == "spam" for _, label in rows) == 747


def test_csv_with_header_quotes_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('id,message,category\n1,"hello, world",greet\n2,"say ""bye""",leave\n')
    assert read_labeled(csv_file, "message", "category") == [("hello, world", "greet"),
                                                             ('say "bye"', "leave")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "x"}\n')
    assert read_labeled(jsonl) == [("a", "1"), ("b", "x")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", "ham\tok\nspam\ttoo\tmany\n", "bad.tsv, line 2: expected 2 fields, found 3"),
    ("bad.tsv", "ham\tok\n\t\n", "line 2: empty text or label"),
    ("bad.jsonl", '{"text": "a", "label": "b"}\n{"text": "a"\n', "line 2: not valid JSON"),
    ("bad.jsonl", '{"text": "a"}\n', "line 1: expected an object with keys 'text' and 'label'"),
    ("bad.csv", "body,kind\nx,y\n", "line 1: the header ['body', 'kind'] has no column 'text'"),
])
def test_malformed_rows_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    columns = (1, 0) if name.endswith(".tsv") else ("text", "label")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_labeled(path, *columns)


def test_balance_and_stratified_split():
    examples = [(f"h{i}", "ham") for i in range(100)] + [(f"s{i}", "spam") for i in range(30)]
    balanced = balance(examples, seed=1)
    assert sum(lbl == "ham" for _, lbl in balanced) == sum(lbl == "spam" for _, lbl in balanced)
    train, val, test = stratified_split(balanced, seed=1)
    assert (len(train), len(val), len(test)) == (42, 6, 12)  # 70/10/20 of 30 per class, x2
    for split in (train, val, test):
        assert sum(lbl == "spam" for _, lbl in split) * 2 == len(split)  # proportions kept
    assert sorted(train + val + test) == sorted(balanced)  # disjoint and complete
    assert stratified_split(balanced, seed=1) == (train, val, test)


# --------------------------------------------------------------------------------- model
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_never_changes_a_prediction(pooling, device):
    model = GPTClassifier(tiny_gpt(), 3, pooling).to(device)
    short, long = CHARS.encode("hi there"), CHARS.encode("a much longer message")
    alone, _ = pad_batch([short])
    batch, lengths = pad_batch([short, long])
    assert batch.shape[1] > alone.shape[1]
    np.testing.assert_allclose(model(batch, lengths).numpy()[0],
                               model(alone, [len(short)]).numpy()[0], rtol=1e-5, atol=1e-6)


# freezing and counting parameters is host bookkeeping: CPU only
def test_trainable_choices_freeze_the_rest():
    model = GPTClassifier(tiny_gpt(), 2)
    head = 16 * 2 + 2
    block = sum(p.size for p in model.gpt.h[1].parameters())
    final_norm = 2 * 16
    counts = {}
    for choice in ("head", "last-block", "last-2", "all"):
        model.set_trainable(choice)
        counts[choice] = model.num_params(trainable_only=True)
    assert counts["head"] == head
    assert counts["last-block"] == head + block + final_norm
    assert counts["last-2"] == head + 2 * block + final_norm
    assert counts["all"] == model.num_params()
    assert model.set_trainable("auto") == "all"  # a small model trains everything
    assert resolve_trainable("auto", 124_439_808) == "last-block"  # GPT-2 124M: the top only
    with pytest.raises(ValueError, match="has 2 blocks"):
        model.set_trainable("last-3")
    with pytest.raises(ValueError, match="unknown --trainable"):
        model.set_trainable("first-block")


def test_metrics_against_hand_computed_values():
    true = np.array([0, 0, 0, 1, 1, 1, 1])
    predicted = np.array([0, 1, 0, 1, 1, 0, 1])
    metrics = classification_metrics(true, predicted, ["ham", "spam"])
    assert metrics["confusion_matrix"] == [[2, 1], [1, 3]]
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["per_class"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.75) and metrics["positive_label"] == "spam"


def synthetic_examples(n, seed):
    """Label 'z' when the text contains the letter z: learnable from the last-token summary."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxy")
    examples = []
    for i in range(n):
        words = "".join(rng.choice(letters, rng.integers(4, 12)))
        if i % 2:
            position = rng.integers(0, len(words))
            words = words[:position] + "z" + words[position:]
        examples.append((words, "z" if i % 2 else "none"))
    return examples


@pytest.mark.parametrize("device", DEVICES)
def test_finetuning_learns_and_round_trips(tmp_path, device):
    train, val = synthetic_examples(160, 0), synthetic_examples(40, 1)
    label_ids = {"none": 0, "z": 1}
    train_set, val_set = encode(train, CHARS, label_ids, 24), encode(val, CHARS, label_ids, 24)
    model = GPTClassifier(tiny_gpt(), 2).to(device)
    model.set_trainable("all")
    config = ClassifierConfig(epochs=12, batch_size=8, learning_rate=3e-3, seed=0)
    history = train_classifier(model, train_set, val_set, config, tmp_path / "run",
                               log=lambda line: None).history
    assert [r["epoch"] for r in history] == list(range(1, 13))  # one evaluation per epoch
    best = [record for record in history if record.get("best")]
    assert len(best) == 1 and best[0]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert best[0]["val_accuracy"] >= 0.9  # chance is 0.5
    _, predicted, _ = evaluate(model, val_set)
    truth = np.array([label for _, label in val_set])
    assert (predicted == truth).mean() == best[0]["val_accuracy"]  # the best epoch's weights
    save_classifier(tmp_path / "clf", model, CHARS, ["none", "z"], 24)
    loaded, tokenizer, labels, max_length = load_classifier(tmp_path / "clf", device)
    assert loaded.device == device
    np.testing.assert_array_equal(evaluate(loaded, val_set)[2], evaluate(model, val_set)[2])
    assert labels == ["none", "z"] and max_length == 24 and tokenizer.chars == CHARS.chars


# ------------------------------------------------------------------------------ commands
@pytest.mark.parametrize("device", DEVICES)
def test_finetune_and_classify_commands(tmp_path, capsys, monkeypatch, device):
    save_model(tmp_path / "base", tiny_gpt(), CHARS)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lbl}) + "\n"
                            for t, lbl in synthetic_examples(80, 2)))
    assert main(["finetune-classifier", "--checkpoint", str(tmp_path / "base"), "--out",
                 str(tmp_path / "clf"), "--data", str(data), "--epochs", "1", "--trainable",
                 "last-block", "--device", device]) == 0
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_precision",
                "test_recall", "test_f1", "test_confusion_matrix"):
        assert key in metrics
    assert metrics["splits"] == {"train": 56, "val": 8, "test": 16}
    kept = [r for r in metrics["history"] if r.get("best")][0]
    assert (metrics["best_epoch"], metrics["val_accuracy"]) == (kept["epoch"], kept["val_accuracy"])
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(tmp_path / "clf"), "--device", device, "abc",
                 "def"]) == 0
    label, probability = capsys.readouterr().out.strip().split("\t")
    assert label in ("none", "z") and 0.5 <= float(probability) <= 1
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("abc\n\nxyz\n"))
    assert main(["classify", "--checkpoint", str(tmp_path / "clf"), "--device", device]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # one line per input line
    assert main(["classify", "--checkpoint", str(tmp_path / "base"), "--device", device]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_classifier_with_lora_trains_few_parameters_and_saves_a_plain_model(tmp_path,
                                                                                   device):
    save_model(tmp_path / "base", tiny_gpt(), CHARS)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lbl}) + "\n"
                            for t, lbl in synthetic_examples(80, 2)))
    assert main(["finetune-classifier", "--checkpoint", str(tmp_path / "base"), "--out",
                 str(tmp_path / "clf"), "--data", str(data), "--epochs", "1", "--lora-rank",
                 "2", "--device", device]) == 0
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert metrics["trainable"] == "lora-2"
    model, _, _, _ = load_classifier(tmp_path / "clf" / "checkpoint", device)
    assert metrics["trainable_params"] < 0.5 * model.num_params()
