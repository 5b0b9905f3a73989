"""Evaluation: sliding-window perplexity, multiple-choice scoring, data files, the CLI."""

import argparse
import json
import math
import string
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend
from tinygrad_llm.evaluate.multiple_choice import (
    Question,
    build_prompt,
    evaluate_questions,
    letter_tokens,
    load_questions,
    shots_by_subject,
)
from tinygrad_llm.evaluate.perplexity import perplexity, score_ids, sliding_windows
from tinygrad_llm.loading import save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tensor import no_grad
from tinygrad_llm.tokenizer import CharTokenizer, GPT2Tokenizer
from tinygrad_llm.train import evaluate as evaluate_command


def tiny_gpt(vocab_size=50257, context_length=32, seed=0, device="cpu") -> GPT:
    backend.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, context_length=context_length, n_layer=1,
                          n_head=2, n_embd=16, tie_weights=False)).to(device)
    model.eval()
    return model


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                      keepdims=True))


# ------------------------------------------------------------------------------ perplexity
@pytest.mark.parametrize("num_tokens,context,stride", [(2, 8, 4), (8, 8, 4), (9, 8, 4),
                                                       (100, 16, 5), (100, 16, 16), (57, 16, 1)])
def test_sliding_windows_score_every_token_exactly_once(num_tokens, context, stride):
    counts = np.zeros(num_tokens, dtype=int)
    for begin, end, first in sliding_windows(num_tokens, context, stride):
        assert end - begin <= context and begin < first <= end
        assert first - begin >= min(first - 1, context - stride)  # the context a token gets
        counts[first:end + 1] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_loss_equals_a_plain_forward_pass_when_the_text_fits(device):
    model = tiny_gpt(vocab_size=40, context_length=16, device=device)
    ids = np.random.default_rng(0).integers(0, 40, 15)  # 14 inputs: one window
    result = score_ids(model, ids, stride=8)
    with no_grad():
        plain = float(model.loss(ids[None, :-1], ids[None, 1:]).item())
    assert result["tokens"] == 14 and result["windows"] == 1
    assert result["nats"] / result["tokens"] == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_counts_every_token_once_and_batching_changes_nothing(device):
    model = tiny_gpt(vocab_size=40, context_length=16, device=device)
    ids = np.random.default_rng(1).integers(0, 40, 101)
    one = score_ids(model, ids, stride=5, batch_size=1)
    many = score_ids(model, ids, stride=5, batch_size=7)
    assert one["tokens"] == many["tokens"] == 100
    assert one["nats"] == pytest.approx(many["nats"], rel=1e-6)
    # by hand: each token scored in the window sliding_windows assigns it
    expected = 0.0
    for begin, end, first in sliding_windows(len(ids), 16, 5):
        with no_grad():
            logp = log_softmax(model(ids[None, begin:end]).numpy()[0])  # (T, V)
        for target in range(first, end + 1):
            expected -= logp[target - 1 - begin, ids[target]]
    assert one["nats"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bits_per_byte_divides_total_nats_by_ln2_and_utf8_bytes(device):
    text = "to be or not to be, that is the question"
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, context_length=16, device=device)
    result = perplexity(model, tokenizer, [text], stride=4)
    nats = result["loss"] * result["tokens"]
    assert result["tokens"] == len(text) - 1
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


# ------------------------------------------------------------------------ data files
def write_csv(path, rows):
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def test_mmlu_csv_folders_name_subjects_and_index_rows(tmp_path):
    write_csv(tmp_path / "high_school_physics_validation.csv",
              [["What falls?", "apples", "clouds", "the sun", "stars", "A"],
               ["Q, with a comma", "1", "2", "3", "4", "d"]])
    write_csv(tmp_path / "anatomy_validation.csv", [["Bones?", "206", "12", "3", "1", "A"]])
    questions = load_questions(tmp_path)
    assert [(q.subject, q.index, q.answer) for q in questions] == [
        ("anatomy", 0, 0), ("high_school_physics", 0, 0), ("high_school_physics", 1, 3)]
    assert questions[2].question == "Q, with a comma"


def test_jsonl_questions_take_any_number_of_choices_and_letter_or_index_answers(tmp_path):
    path = tmp_path / "quiz.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1})
                    + "\n\n" + json.dumps({"question": "Sky?", "choices": ["blue", "green"],
                                           "answer": "A", "subject": "nature"}) + "\n")
    q1, q2 = load_questions(path)
    assert (q1.subject, q1.choices, q1.answer) == ("quiz", ["3", "4", "5"], 1)
    assert (q2.subject, q2.answer, q2.index) == ("nature", 0, 1)


@pytest.mark.parametrize("name,content,line", [
    ("bad_val.csv", "ok?,a,b,c,d,A\nshort,a,B\n", 2),
    ("bad_val.csv", "ok?,a,b,c,d,A\nok?,a,b,c,d,A\nwhat?,a,b,c,d,E\n", 3),
    ("bad.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": \n', 2),
    ("bad.jsonl", '{"question": "q", "choices": ["a"], "answer": 0}\n', 1),
    ("bad.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n', 1),
])
def test_malformed_question_lines_raise_one_line_errors_naming_file_and_line(tmp_path, name,
                                                                             content, line):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_questions(path)
    message = str(error.value)
    assert f"{path}, line {line}" in message and "\n" not in message


# --------------------------------------------------------------------------- prompts
def test_prompt_is_mmlu_format_with_shots_from_the_same_subject():
    shot = Question("college_biology", 0, "Cells?", ["a", "b", "c", "d"], 1)
    other = Question("law", 0, "Law?", ["a", "b", "c", "d"], 2)
    question = Question("college_biology", 3, "DNA?", ["x", "y", "z", "w"], 0)
    shots = shots_by_subject([shot, other, Question("college_biology", 1, "More?",
                                                    ["a", "b", "c", "d"], 0)], 1)
    prompt = build_prompt(question, shots[question.subject])
    assert prompt == ("The following are multiple choice questions (with answers) about college "
                      "biology.\n\nCells?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                      "DNA?\nA. x\nB. y\nC. z\nD. w\nAnswer:")


def test_gpt2_letters_with_a_leading_space_are_single_tokens_unlike_bare_letters():
    tokenizer = GPT2Tokenizer()
    prefix, ids = letter_tokens(tokenizer, 4)
    assert prefix == [] and ids == [317, 347, 327, 360]  # " A", " B", " C", " D"
    assert [tokenizer.encode(c) for c in "ABCD"] == [[32], [33], [34], [35]]
    # after "Answer:" the text continues " A": GPT-2 tokenizes "Answer: A" as "Answer", ":", " A"
    assert tokenizer.encode("Answer: A")[-1] == 317


# ------------------------------------------------------------- a scripted model: exact accuracy
class ScriptedModel:
    """At the last position, favours the character after the last '#' in the row: a question
    "... #C" makes it answer C. Checks that padding is masked and positions restart per row."""

    def __init__(self, tokenizer, context_length=400):
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(context_length=context_length)
        self.training = False
        self.calls = []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, ids, positions=None, padding_mask=None, last_only=False):
        ids = np.asarray(ids)
        self.calls.append(ids.shape)
        assert last_only and padding_mask is not None
        logits = np.zeros((len(ids), 1, self.tokenizer.vocab_size), dtype=np.float32)
        hash_id = self.tokenizer.encode("#")[0]
        for row in range(len(ids)):
            real = ids[row][padding_mask[row]]
            assert positions[row][padding_mask[row]].tolist() == list(range(len(real)))
            marks = np.nonzero(real == hash_id)[0]
            logits[row, 0, real[marks[-1] + 1]] = 5.0  # the letter after the last '#'
        return SimpleNamespace(data=logits)


def scripted_questions():
    believed = "ABCDABCDAB"  # what the model will answer
    truth = "ABCDABCDCC"  # 8 of 10 right
    return [Question("logic", i, f"Question {i}{' with more words' * (i % 3)} #{b}",
                     ["w", "x", "y", "z"], "ABCD".index(t))
            for i, (b, t) in enumerate(zip(believed, truth, strict=True))]


# a scripted NumPy model, no device: CPU only
def test_letter_method_reaches_the_exact_accuracy_of_a_scripted_model():
    tokenizer = CharTokenizer("".join(sorted(set(string.printable))))
    model = ScriptedModel(tokenizer)
    records, metrics = evaluate_questions(model, tokenizer, scripted_questions(), batch_size=3)
    assert metrics["accuracy"] == pytest.approx(0.8) and metrics["n"] == 10
    assert metrics["standard_error"] == pytest.approx(math.sqrt(0.8 * 0.2 / 10))
    assert metrics["random_baseline"] == pytest.approx(0.25)
    assert metrics["per_subject"]["logic"]["correct"] == 8
    assert [r["prediction"] for r in records] == list("ABCDABCDAB")
    assert len(model.calls) == 4  # batches of 3, 3, 3, 1
    # the character tokenizer splits " A" into " " + "A": the space joins the prompt
    assert letter_tokens(tokenizer, 4)[0] == tokenizer.encode(" ")


# ----------------------------------------------------- a real tiny GPT: against plain forwards
@pytest.mark.parametrize("device", DEVICES)
def test_letter_logprobs_equal_log_softmax_of_a_plain_forward_pass(device):
    tokenizer = GPT2Tokenizer()
    model = tiny_gpt(context_length=64, device=device)
    questions = [Question("anatomy", i, "Which bone? " * (i + 1), ["femur", "ulna", "skull",
                                                                "rib"], i % 4) for i in range(5)]
    records, metrics = evaluate_questions(model, tokenizer, questions, batch_size=2)
    assert metrics["cut_from_left"] == 0
    for record in records:
        ids = np.array([tokenizer.encode(record["prompt"])])
        with no_grad():
            logp = log_softmax(model(ids).numpy()[0, -1])  # (V,)
        expected = {letter: logp[tokenizer.encode(" " + letter)[0]] for letter in "ABCD"}
        for letter in "ABCD":
            assert record["logprobs"][letter] == pytest.approx(expected[letter], abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_prompts_longer_than_the_context_are_cut_from_the_left_and_counted(device):
    tokenizer = GPT2Tokenizer()
    model = tiny_gpt(context_length=48, device=device)
    questions = [Question("anatomy", 0, "Which bone is long? " * 8, ["a", "b", "c", "d"], 0),
                 Question("anatomy", 1, "Short?", ["a", "b", "c", "d"], 1)]
    records, metrics = evaluate_questions(model, tokenizer, questions, batch_size=2)
    assert metrics["cut_from_left"] == 1
    assert [r["cut_from_left"] for r in records] == [True, False]
    ids = np.array([tokenizer.encode(records[0]["prompt"])[-48:]])
    with no_grad():
        logp = log_softmax(model(ids).numpy()[0, -1])
    assert records[0]["logprobs"]["A"] == pytest.approx(logp[317], abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_continuation_scores_sum_and_mean_of_each_choice_tokens(device):
    tokenizer = GPT2Tokenizer()
    model = tiny_gpt(context_length=64, device=device)
    questions = [Question("misc", 0, "Capital of France?", ["Paris", "a town in Spain", "Rome"],
                          0),
                 Question("misc", 1, "Colour of grass?", ["green", "blue sky blue"], 1)]
    records, metrics = evaluate_questions(model, tokenizer, questions, method="continuation",
                                          batch_size=3)
    for record, question in zip(records, questions, strict=True):
        prompt_ids = tokenizer.encode(record["prompt"])
        for letter, choice in zip("ABC", question.choices, strict=False):
            choice_ids = tokenizer.encode(" " + choice)
            ids = np.array([prompt_ids + choice_ids])
            with no_grad():
                logp = log_softmax(model(ids[:, :-1]).numpy()[0])  # (T-1, V)
            picked = [logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(choice_ids)]
            assert record["logprobs"][letter] == pytest.approx(sum(picked), abs=1e-4)
            assert record["logprobs_mean"][letter] == pytest.approx(np.mean(picked), abs=1e-4)
    assert {"acc", "acc_norm", "accuracy"} <= set(metrics)
    assert metrics["random_baseline"] == pytest.approx((1 / 3 + 1 / 2) / 2)


# -------------------------------------------------------------------------------- the CLI
def parse(argv):
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def checkpoint(tmp_path):
    save_model(tmp_path / "model", tiny_gpt(context_length=64), GPT2Tokenizer())
    return tmp_path / "model"


@pytest.mark.parametrize("device", DEVICES)
def test_mc_command_writes_predictions_and_metrics(tmp_path, checkpoint, capsys, device):
    data, dev = tmp_path / "val", tmp_path / "dev"
    data.mkdir()
    dev.mkdir()
    write_csv(data / "astronomy_val.csv", [[f"Star {i}?", "a", "b", "c", "d", "ABCD"[i % 4]]
                                           for i in range(5)])
    write_csv(dev / "astronomy_dev.csv", [["Sun?", "star", "moon", "rock", "gas", "A"]])
    args = parse(["mc", "--checkpoint", str(checkpoint), "--data", str(data), "--dev", str(dev),
                  "--shots", "1", "--out", str(tmp_path / "out"), "--limit", "4", "--device",
                  device, "--quiet"])
    assert evaluate_command.run(args) == 0
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4 and [r["index"] for r in records] == [0, 1, 2, 3]
    assert set(records[0]) >= {"subject", "index", "prompt", "answer", "prediction", "logprobs"}
    assert "Sun?\nA. star" in records[0]["prompt"] and set(records[0]["logprobs"]) == set("ABCD")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["shots"] == 1 and "astronomy" in metrics["per_subject"]
    assert {"accuracy", "standard_error", "random_baseline"} <= set(metrics)
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_through_the_tinygrad_llm_command(tmp_path, checkpoint, monkeypatch, capsys,
                                                   device):
    from tinygrad_llm.train import cli

    monkeypatch.setitem(cli.COMMANDS, "evaluate", (evaluate_command, "evaluate a model"))
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 10)
    assert cli.main(["evaluate", "perplexity", "--checkpoint", str(checkpoint), "--data",
                     str(text), "--stride", "16", "--device", device, "--quiet"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert cli.main(["evaluate", "perplexity", "--checkpoint", str(checkpoint), "--data",
                     str(text), "--stride", "65", "--device", device, "--quiet"]) == 2
    assert "--stride 65 is longer" in capsys.readouterr().err
    bad = tmp_path / "bad_val.csv"
    bad.write_text("q,a,b,c,d,A\nq,a,b\n")
    assert cli.main(["evaluate", "mc", "--checkpoint", str(checkpoint), "--data", str(bad),
                     "--out", str(tmp_path / "out"), "--device", device, "--quiet"]) == 2
    assert f"{bad}, line 2" in capsys.readouterr().err
    assert cli.main(["evaluate", "mc", "--checkpoint", str(checkpoint), "--data", str(bad),
                     "--out", str(tmp_path / "out"), "--shots", "2", "--device", device,
                     "--quiet"]) == 2
    assert "--shots needs --dev" in capsys.readouterr().err


# the judge runs no model: CPU only
def test_judge_without_the_openai_client_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    from tinygrad_llm.train import cli

    monkeypatch.setitem(sys.modules, "openai", None)  # import openai -> ImportError
    monkeypatch.setitem(cli.COMMANDS, "evaluate", (evaluate_command, "evaluate a model"))
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"instruction": "i", "input": "", "output": "o",
                                     "model_response": "r"}) + "\n")
    assert cli.main(["evaluate", "judge", "--responses", str(responses), "--base-url",
                     "http://127.0.0.1:9/v1", "--model", "m", "--out",
                     str(tmp_path / "out")]) == 2
    assert "pip install 'tinygrad_llm[eval]'" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_perplexity_of_a_folder_scores_each_text_file_as_its_own_document(tmp_path, checkpoint,
                                                                          device):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("Once more unto the breach, dear friends. " * 5)
    (folder / "b.txt").write_text("Now is the winter of our discontent. " * 3)
    (folder / "notes.md").write_text("not scored")
    out = tmp_path / "ppl"
    assert evaluate_command.run(parse(["perplexity", "--checkpoint", str(checkpoint), "--data",
                                       str(folder), "--out", str(out), "--device", device,
                                       "--quiet"])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tokenizer = GPT2Tokenizer()
    texts = [(folder / name).read_text() for name in ("a.txt", "b.txt")]
    assert metrics["documents"] == 2 and metrics["stride"] == 32
    assert metrics["tokens"] == sum(len(tokenizer.encode(t)) - 1 for t in texts)
    assert metrics["bytes"] == sum(len(t.encode()) for t in texts)
