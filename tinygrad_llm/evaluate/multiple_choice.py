"""Multiple-choice questions (MMLU and the like): which answer does the model find most likely?

    question + choices -> prompt "...\\nAnswer:" -> model
        letter:        log p(" A"), log p(" B") ... of the next token      -> argmax
        continuation:  log p(choice text | prompt), summed (acc) and
                       per token (acc_norm)                                 -> argmax

Data: MMLU's CSV layout (``question,A,B,C,D,answer``, no header; one file or a folder of
``<subject>_<split>.csv`` files) or JSONL records with ``question``, ``choices`` (any number) and
``answer`` (a letter or a 0-based index). The prompt is MMLU's own (Hendrycks et al. 2021);
docs/evaluation.md shows it and explains why the letters carry a leading space.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import backend
from ..checkpoint import read_jsonl
from ..tensor import no_grad
from .perplexity import token_logprobs

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPLITS = ("auxiliary_train", "train", "dev", "val", "validation", "test")


@dataclass
class Question:
    """One question: its choices, the right one's index, and where it came from."""

    subject: str
    index: int  # 0-based row (or line) in its file
    question: str
    choices: list[str]
    answer: int
    source: str = field(default="", repr=False)


# ------------------------------------------------------------------------------- reading
def subject_of(path: Path) -> str:
    """``abstract_algebra_dev.csv`` -> ``abstract_algebra``: the file name without its split."""
    stem = path.stem
    for split in SPLITS:
        if stem.endswith("_" + split):
            return stem[:-len(split) - 1]
    return stem


def _answer_index(value, num_choices: int, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise ValueError(f"{where}: the answer {value!r} should be a letter (A, B, ...) or a "
                         "0-based choice index")
    if not 0 <= index < num_choices:
        raise ValueError(f"{where}: the answer {value!r} names no choice (there are "
                         f"{num_choices})")
    return index


def read_csv(path: Path) -> list[Question]:
    """MMLU's layout: question, two or more choices, the answer letter; no header."""
    questions = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if not row:
                    continue
                if len(row) < 4:
                    raise ValueError(f"{where}: expected question,A,B,...,answer (at least 4 "
                                     f"fields), got {len(row)}")
                choices = row[1:-1]
                answer = _answer_index(row[-1], len(choices), where)
                questions.append(Question(subject_of(path), len(questions), row[0], choices,
                                          answer, str(path)))
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
    return questions


def read_questions_jsonl(path: Path) -> list[Question]:
    """Records with question, choices (a list) and answer (a letter or a 0-based index)."""
    questions = []
    for record, where in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise ValueError(f"{where}: expected an object with a 'question' string")
        choices = record.get("choices")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{where}: 'choices' should be a list of two or more strings")
        if len(choices) > len(LETTERS):
            raise ValueError(f"{where}: {len(choices)} choices; at most 26 are supported")
        answer = _answer_index(record.get("answer"), len(choices), where)
        subject = record.get("subject") or subject_of(path)
        questions.append(Question(str(subject), len(questions), record["question"],
                                  choices, answer, str(path)))
    return questions


def load_questions(path) -> list[Question]:
    """Questions of a .csv or .jsonl file, or of every such file in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl"))
        if not files:
            raise ValueError(f"{path} holds no .csv or .jsonl files of questions")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{path} does not exist")
    questions = []
    for file in files:
        questions += read_questions_jsonl(file) if file.suffix == ".jsonl" else read_csv(file)
    return questions


# ------------------------------------------------------------------------------ prompts
def format_question(question: Question, answer: bool = False) -> str:
    """``{question}\\nA. {A}\\n...\\nAnswer:`` and, for a shot, `` {letter}\\n\\n``."""
    text = question.question + "".join(f"\n{LETTERS[i]}. {c}"
                                       for i, c in enumerate(question.choices)) + "\nAnswer:"
    return text + f" {LETTERS[question.answer]}\n\n" if answer else text


def build_prompt(question: Question, shots: list[Question] = ()) -> str:
    """MMLU's prompt: a header naming the subject, the solved shots, then the question."""
    header = ("The following are multiple choice questions (with answers) about "
              f"{question.subject.replace('_', ' ')}.\n\n")
    return header + "".join(format_question(s, answer=True) for s in shots) \
        + format_question(question)


def shots_by_subject(dev: list[Question], k: int) -> dict[str, list[Question]]:
    """The first ``k`` questions of each subject of the dev split."""
    grouped: dict[str, list[Question]] = {}
    for q in dev:
        grouped.setdefault(q.subject, [])
        if len(grouped[q.subject]) < k:
            grouped[q.subject].append(q)
    return grouped


# ------------------------------------------------------------------------------ scoring
def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def letter_tokens(tokenizer, num_choices: int) -> tuple[list[int], list[int]]:
    """(shared prefix ids, one id per letter) of " A", " B", ...

    With GPT-2's tokenizer each " X" is one token and the prefix is empty; with a character
    tokenizer the shared " " joins the prompt and "A", "B" ... are the tokens compared.
    """
    encoded = [tokenizer.encode(" " + LETTERS[i]) for i in range(num_choices)]
    prefix = 0
    while all(len(e) > prefix + 1 for e in encoded) and len({e[prefix] for e in encoded}) == 1:
        prefix += 1
    distinct = len({e[prefix] for e in encoded}) == len(encoded)
    if any(len(e) != prefix + 1 for e in encoded) or not distinct:
        raise ValueError("the tokenizer does not give each answer letter a token of its own; "
                         "use --method continuation")
    return encoded[0][:prefix], [e[prefix] for e in encoded]


def score_letters(model, tokenizer, prompts: list[str], num_choices: list[int],
                  batch_size: int = 8, progress: bool = False) -> tuple[list[np.ndarray], int]:
    """Next-token log-probabilities of each question's letters after its prompt.

    Prompts are left-padded into batches (padding masked, positions counted from each prompt's
    first token, as generate.py does) and cut from the left to the context length.
    Returns (one array (num_choices,) per prompt, whether each prompt was cut).
    """
    context = model.config.context_length
    widest = max(num_choices)
    prefix, letter_ids = letter_tokens(tokenizer, widest)
    encoded, cut = [], []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) + prefix
        cut.append(len(ids) > context)
        encoded.append(ids[-context:])
    results = []
    with no_grad(), tqdm(total=len(prompts), disable=not progress, unit="question") as bar:
        for batch in _batches(list(range(len(prompts))), batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=bool)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = encoded[i]
                mask[row, width - len(encoded[i]):] = True
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, T)
            logits = model(ids, positions=positions, padding_mask=mask, last_only=True).data
            last = backend.to_numpy(logits[:, -1, :]).astype(np.float64)  # (B, 1, V) -> (B, V)
            peak = last.max(axis=-1, keepdims=True)
            logprobs = last - peak - np.log(np.exp(last - peak).sum(axis=-1, keepdims=True))
            logprobs = logprobs[:, letter_ids]  # (B, V) -> (B, letters)
            results += [logprobs[row, :num_choices[i]] for row, i in enumerate(batch)]
            bar.update(len(batch))
    return results, cut


def score_continuations(model, tokenizer, prompts: list[str], choices: list[list[str]],
                        batch_size: int = 8, progress: bool = False):
    """Log-probability of each choice's text (with a leading space) after its prompt.

    Returns (summed log-probs per prompt, per-token mean log-probs per prompt, whether any of
    each prompt's prompt + choice sequences was cut from the left to the context length).
    """
    context = model.config.context_length
    pairs, cut = [], [False] * len(prompts)  # (question, ids, number of choice tokens)
    for q, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        prompt_ids = tokenizer.encode(prompt)
        for option in options:
            option_ids = tokenizer.encode(" " + option)[:context - 1] or [0]
            ids = prompt_ids + option_ids
            cut[q] |= len(ids) > context
            pairs.append((q, ids[-context:], len(option_ids)))
    sums = [[] for _ in prompts]
    means = [[] for _ in prompts]
    with no_grad(), tqdm(total=len(pairs), disable=not progress, unit="choice") as bar:
        for batch in _batches(pairs, batch_size):
            width = max(len(ids) for _, ids, _ in batch) - 1
            inputs = np.zeros((len(batch), width), dtype=np.int64)  # right-padded: causal
            targets = np.zeros((len(batch), width), dtype=np.int64)  # attention never looks
            for row, (_, ids, _) in enumerate(batch):  # at the padding after a sequence
                inputs[row, :len(ids) - 1] = ids[:-1]
                targets[row, :len(ids) - 1] = ids[1:]
            logits = model(inputs).data  # (B, T, V)
            for row, (q, ids, n) in enumerate(batch):
                logprobs = token_logprobs(logits[row:row + 1], targets[row:row + 1])[0]  # (T,)
                picked = logprobs[len(ids) - 1 - n:len(ids) - 1]  # the choice's tokens
                sums[q].append(float(picked.sum()))
                means[q].append(float(picked.mean()))
            bar.update(len(batch))
    return [np.array(s) for s in sums], [np.array(m) for m in means], cut


def evaluate_questions(model, tokenizer, questions: list[Question], shots=None,
                       method: str = "letter", batch_size: int = 8,
                       progress: bool = False) -> tuple[list[dict], dict]:
    """Score every question; return (prediction records, metrics).

    ``shots``: {subject: [Question]} from ``shots_by_subject``, or None for zero-shot.
    """
    if not questions:
        raise ValueError("no questions to evaluate")
    prompts = [build_prompt(q, (shots or {}).get(q.subject, [])) for q in questions]
    was_training = model.training
    model.eval()
    try:
        if method == "letter":
            scores, cut = score_letters(model, tokenizer, prompts,
                                        [len(q.choices) for q in questions], batch_size,
                                        progress)
            normed = None
        elif method == "continuation":
            scores, normed, cut = score_continuations(model, tokenizer, prompts,
                                                      [q.choices for q in questions],
                                                      batch_size, progress)
        else:
            raise ValueError(f"unknown method {method!r}: letter or continuation")
    finally:
        model.train(was_training)
    records = []
    for i, (q, prompt) in enumerate(zip(questions, prompts, strict=True)):
        letters = LETTERS[:len(q.choices)]
        record = {"subject": q.subject, "index": q.index, "prompt": prompt,
                  "answer": letters[q.answer], "prediction": letters[int(np.argmax(scores[i]))],
                  "logprobs": {k: float(v) for k, v in zip(letters, scores[i], strict=True)},
                  "cut_from_left": cut[i]}
        if normed is not None:
            record["prediction_norm"] = letters[int(np.argmax(normed[i]))]
            record["logprobs_mean"] = {k: float(v)
                                       for k, v in zip(letters, normed[i], strict=True)}
        records.append(record)
    metrics = summarize(records, questions)
    metrics.update(method=method, cut_from_left=sum(cut))
    return records, metrics


def summarize(records: list[dict], questions: list[Question]) -> dict:
    """Accuracy, its standard error, per-subject accuracy and the random baseline."""
    n = len(records)
    correct = [r["prediction"] == r["answer"] for r in records]
    accuracy = sum(correct) / n
    per_subject: dict[str, dict] = {}
    for r, ok in zip(records, correct, strict=True):
        entry = per_subject.setdefault(r["subject"], {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += ok
    for entry in per_subject.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    metrics = {"accuracy": accuracy, "n": n,
               "standard_error": math.sqrt(accuracy * (1 - accuracy) / n),
               "random_baseline": sum(1 / len(q.choices) for q in questions) / n,
               "per_subject": dict(sorted(per_subject.items()))}
    if records and "prediction_norm" in records[0]:
        acc_norm = sum(r["prediction_norm"] == r["answer"] for r in records) / n
        metrics.update(acc=accuracy, acc_norm=acc_norm,
                       acc_norm_standard_error=math.sqrt(acc_norm * (1 - acc_norm) / n))
    return metrics
