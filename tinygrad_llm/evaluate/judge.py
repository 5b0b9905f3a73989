"""LLM-as-judge: a stronger model grades answers over any OpenAI-compatible chat endpoint.

    responses.jsonl (instruction, input, output, model_response)
        -> judge prompt -> POST /v1/chat/completions (temperature 0, a seed)
        -> reply "85" -> first integer in range -> score (or failed)

Pointwise: each response gets 0-100 (``score100``, the prompt of Raschka's "Build a Large
Language Model (From Scratch)", ch. 7) or 1-5 (``likert5``) against the reference answer.
Pairwise: the judge sees two answers to one instruction and says "A", "B" or "tie"; arena.py
turns those verdicts into win rates and ratings. Calls run in a thread pool, each retried with
exponential backoff. The ``openai`` client is optional: ``pip install 'tinygrad_llm[eval]'``.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import read_jsonl

INSTALL_HINT = "the judge needs the openai client: pip install 'tinygrad_llm[eval]'"

# The book's ch. 7 judge prompt, around the Alpaca-style input it was written for.
SCORE100_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model "
                   "response `{response}` on a scale from 0 to 100, where 100 is the best score. "
                   "Respond with the integer number only.")
LIKERT5_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, score the model "
                  "response `{response}` on a scale from 1 to 5, where 1 is wrong or unhelpful, "
                  "3 is partly correct and 5 is as correct and helpful as the correct output. "
                  "Respond with the integer number only.")
RUBRICS = {"score100": (SCORE100_PROMPT, 0, 100), "likert5": (LIKERT5_PROMPT, 1, 5)}
PAIRWISE_PROMPT = ("Given the input `{prompt}` and correct output `{output}`, which of two model "
                   "responses is better?\n\nResponse A: `{a}`\n\nResponse B: `{b}`\n\n"
                   "Judge correctness first, then helpfulness and clarity; ignore which response "
                   "comes first and how long it is. Respond with A, B or tie only.")


# ------------------------------------------------------------------------------ data
def format_input(record: dict) -> str:
    """The Alpaca-style prompt the model answered (the book's ``format_input``)."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{record['instruction']}")
    return text + (f"\n\n### Input:\n{record['input']}" if record.get("input") else "")


def load_responses(path) -> list[dict]:
    """Records with instruction, output, model_response (and an optional input), as
    finetune-instruct writes them to test-responses.jsonl."""
    path = Path(path)
    records = []
    for record, where in read_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for key in ("instruction", "output", "model_response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: the field {key!r} is missing or not a string "
                                 "(expected instruction, input, output, model_response)")
        record.setdefault("input", "")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no responses")
    return records


# ---------------------------------------------------------------------------- parsing
def parse_score(reply: str | None, low: int, high: int) -> int | None:
    """The first integer of ``reply`` in [low, high] ("Score: 85/100" -> 85), else None."""
    for match in re.finditer(r"-?\d+(?:\.\d+)?", reply or ""):
        text = match.group()
        if "." not in text and low <= int(text) <= high:
            return int(text)
    return None


def parse_verdict(reply: str | None) -> str | None:
    """"A", "B" or "tie" from the judge's reply (its first such word), else None."""
    match = re.search(r"\b(A|B)\b|\b([Tt][Ii][Ee])\b", reply or "")
    if match is None:
        return None
    return match.group(1) or "tie"


# ------------------------------------------------------------------------- the client
def openai_chat(base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                seed: int | None = 0, max_tokens: int = 16):
    """A function messages -> reply text, over an OpenAI-compatible endpoint (one attempt per
    call: retries are ``with_retries``' job)."""
    try:
        import openai
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout,
                           max_retries=0)

    def chat(messages: list[dict]) -> str:
        response = client.chat.completions.create(model=model, messages=messages,
                                                  temperature=0, seed=seed,
                                                  max_tokens=max_tokens)
        return response.choices[0].message.content or ""

    return chat


def with_retries(chat, messages: list[dict], retries: int = 3,
                 backoff: float = 1.0) -> tuple[str | None, str | None]:
    """(reply, None) or (None, the last error) after 1 + ``retries`` attempts, waiting
    backoff, 2 backoff, 4 backoff ... seconds between them."""
    error = None
    for attempt in range(retries + 1):
        try:
            return chat(messages), None
        except Exception as exc:  # network, timeout, HTTP 5xx, a malformed response ...
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    return None, error


def _run_all(function, items: list, concurrency: int, progress: bool) -> list:
    """``function`` over ``items`` in a pool of ``concurrency`` threads, results in order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(items), disable=not progress, unit="call") as bar:
        futures = [pool.submit(function, item) for item in items]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
    return results


# ------------------------------------------------------------------------ pointwise
def score_responses(chat, records: list[dict], rubric: str = "score100", concurrency: int = 4,
                    retries: int = 3, backoff: float = 1.0,
                    progress: bool = False) -> tuple[list[dict], dict]:
    """Judge every record; return (one score record per response, metrics)."""
    template, low, high = RUBRICS[rubric]

    def judge(record: dict) -> dict:
        prompt = template.format(prompt=format_input(record), output=record["output"],
                                 response=record["model_response"])
        reply, error = with_retries(chat, [{"role": "user", "content": prompt}], retries,
                                    backoff)
        score = parse_score(reply, low, high)
        if reply is not None and score is None:
            error = f"no integer in {low}..{high} in the reply"
        return {"instruction": record["instruction"], "input": record["input"],
                "output": record["output"], "model_response": record["model_response"],
                "score": score, "reply": reply, "error": error}

    scores = _run_all(judge, records, concurrency, progress)
    for index, entry in enumerate(scores):
        entry["index"] = index
    return scores, score_metrics(scores, rubric)


def score_metrics(scores: list[dict], rubric: str) -> dict:
    """mean_score, n_scored, n_failed and a histogram (10 bins of 10, or the 5 Likert values)."""
    _, low, high = RUBRICS[rubric]
    values = [s["score"] for s in scores if s["score"] is not None]
    if rubric == "likert5":
        edges = list(range(low, high + 2))  # 1, 2, ..., 6: one bin per value
        counts = [values.count(v) for v in range(low, high + 1)]
    else:
        edges = list(range(0, 101, 10))  # [0, 10), ..., [90, 100]: 100 joins the last bin
        counts = [0] * 10
        for v in values:
            counts[min(v // 10, 9)] += 1
    return {"mean_score": sum(values) / len(values) if values else None,
            "n_scored": len(values), "n_failed": len(scores) - len(values), "n": len(scores),
            "rubric": rubric, "score_range": [low, high],
            "histogram": {"edges": edges, "counts": counts}}


# ------------------------------------------------------------------------- pairwise
def judge_pair(chat, record: dict, answer_a: str, answer_b: str, retries: int = 3,
               backoff: float = 1.0) -> tuple[str | None, str | None, str | None]:
    """(verdict "A"/"B"/"tie" or None, the reply, an error) for one ordering of two answers."""
    prompt = PAIRWISE_PROMPT.format(prompt=format_input(record), output=record["output"],
                                    a=answer_a, b=answer_b)
    reply, error = with_retries(chat, [{"role": "user", "content": prompt}], retries, backoff)
    verdict = parse_verdict(reply)
    if reply is not None and verdict is None:
        error = "no A, B or tie in the reply"
    return verdict, reply, error


def align_responses(runs: list[list[dict]]) -> list[tuple[dict, list[str]]]:
    """The instructions every run answered, matched on (instruction, input), in the first run's
    order: [(record, [each run's answer])]."""
    keyed = [{(r["instruction"], r["input"]): r["model_response"] for r in run} for run in runs]
    common = []
    for record in runs[0]:
        key = (record["instruction"], record["input"])
        if all(key in answers for answers in keyed):
            common.append((record, [answers[key] for answers in keyed]))
    return common
