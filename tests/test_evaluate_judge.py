"""LLM-as-judge and pairwise rankings: parsing, Elo and Bradley-Terry, and both commands against
a scripted OpenAI-compatible server on 127.0.0.1."""

import argparse
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tinygrad_llm.evaluate.arena import bradley_terry, combine, elo
from tinygrad_llm.evaluate.judge import parse_score, parse_verdict, score_metrics
from tinygrad_llm.train import evaluate as evaluate_command


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("reply,expected", [
    ("85", 85), (" 100\n", 100), ("Score: 70/100", 70), ("I'd say 7.5, no, 60", 60),
    ("-5 then 40", 40), ("250", None), ("no idea", None), ("", None), (None, None)])
def test_score_is_the_first_integer_in_range(reply, expected):
    assert parse_score(reply, 0, 100) == expected


def test_likert_scores_must_lie_in_one_to_five():
    assert parse_score("0 is wrong, I give 4", 1, 5) == 4
    assert parse_score("9", 1, 5) is None


@pytest.mark.parametrize("reply,expected", [
    ("A", "A"), ("B.", "B"), ("tie", "tie"), ("Tie", "tie"), ("Response B is better", "B"),
    ("a tie", "tie"), ("neither", None), ("", None)])
def test_pairwise_verdicts(reply, expected):
    assert parse_verdict(reply) == expected


def test_histogram_has_ten_bins_of_ten_with_100_in_the_last():
    scores = [{"score": s} for s in (0, 9, 10, 55, 99, 100)] + [{"score": None}]
    metrics = score_metrics(scores, "score100")
    assert metrics["histogram"]["counts"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert (metrics["n_scored"], metrics["n_failed"]) == (6, 1)
    assert metrics["mean_score"] == pytest.approx(sum((0, 9, 10, 55, 99, 100)) / 6)
    assert score_metrics([{"score": 3}, {"score": 5}], "likert5")["histogram"]["counts"] == \
        [0, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- ratings
def test_both_orders_combine_so_position_bias_cancels():
    assert combine("A", "B") == 1.0  # i won when shown first and when shown second
    assert combine("A", "tie") == 1.0
    assert combine("B", "A") == 0.0
    assert combine("tie", "A") == 0.0
    assert combine("A", "A") == 0.5  # "the first one" both times: position bias, a tie
    assert combine("tie", "tie") == 0.5
    assert combine(None, "A") is None


def known_order_games():
    """Model 0 > 1 > 2: each beats the next 8 times of 10, ties once, loses once."""
    games = []
    for i, j in ((0, 1), (1, 2), (0, 2)):
        games += [(i, j, 1.0)] * 8 + [(i, j, 0.5), (j, i, 1.0)]
    return games


def test_elo_and_bradley_terry_recover_a_known_order():
    games = known_order_games()
    for ratings in (elo(games, 3, seed=0), bradley_terry(games, 3)):
        assert ratings[0] > ratings[1] > ratings[2]
    assert np.mean(elo(games, 3)) == pytest.approx(1000)  # Elo only moves points around
    assert np.mean(bradley_terry(games, 3)) == pytest.approx(1000)  # geometric mean fixed


def test_bradley_terry_of_two_models_is_the_odds_of_their_record():
    # 7 wins, 2 ties, 1 loss -> 8 of 10 with ties as halves; + one virtual tie: 8.5 to 2.5
    games = [(0, 1, 1.0)] * 7 + [(0, 1, 0.5)] * 2 + [(1, 0, 1.0)]
    ratings = bradley_terry(games, 2)
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(8.5 / 2.5), abs=1e-6)
    assert bradley_terry([(0, 1, 0.5)] * 5, 2) == pytest.approx([1000, 1000])


def test_elo_is_seeded():
    games = known_order_games()
    assert elo(games, 3, seed=3) == pytest.approx(elo(games, 3, seed=3))


# --------------------------------------------------------------- a scripted judge server
class ScriptedJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: the reply depends on words in the judged response(s)."""

    calls: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        assert request["temperature"] == 0 and request["seed"] == 7
        prompt = request["messages"][-1]["content"]
        with self.lock:
            self.calls[prompt] = self.calls.get(prompt, 0) + 1
            attempt = self.calls[prompt]
        if "Response A:" in prompt:
            text = self.pairwise(prompt)
        else:
            response = re.search(r"score the model response `(.*?)`", prompt, re.S).group(1)
            if "ERROR" in response:
                return self.reply(500, {"error": {"message": "boom"}})
            if "FLAKY" in response and attempt == 1:
                return self.reply(500, {"error": {"message": "try again"}})
            if "SLOW" in response:
                time.sleep(1.5)
            text = {"GOOD": "85", "FLAKY": "70", "WORDY": "Score: 90/100", "SLOW": "50",
                    "GARBAGE": "I cannot judge this"}[response.split()[0]]
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})

    @staticmethod
    def pairwise(prompt):
        a = re.search(r"Response A: `(.*?)`", prompt, re.S).group(1)
        b = re.search(r"Response B: `(.*?)`", prompt, re.S).group(1)
        if "BIASED" in prompt:
            return "A"  # always the first shown: must end as a tie
        if "GARBLED" in prompt:
            return "hmm"
        rank = {"best": 3, "middle": 2, "worst": 1}
        ra, rb = rank[a.split()[0]], rank[b.split()[0]]
        return "tie" if ra == rb else "A" if ra > rb else "B"


@pytest.fixture
def judge_server():
    pytest.importorskip("openai")
    ScriptedJudge.calls = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def write_responses(path, answers, instructions=None):
    instructions = instructions or [f"Task {i}" for i in range(len(answers))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": ins, "input": "", "output": "ref",
                                        "model_response": ans, "well_formed": True}) + "\n"
                            for ins, ans in zip(instructions, answers, strict=True)))
    return path


def run_command(argv):
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    return evaluate_command.run(parser.parse_args(argv))


def test_judge_scores_counts_failures_and_survives_errors_and_timeouts(tmp_path, judge_server):
    responses = write_responses(tmp_path / "sft" / "test-responses.jsonl",
                                ["GOOD answer", "GARBAGE answer", "SLOW answer", "ERROR answer",
                                 "FLAKY answer", "WORDY answer", "GOOD again"])
    out = tmp_path / "judged"
    assert run_command(["judge", "--responses", str(responses), "--base-url", judge_server,
                        "--model", "judge", "--out", str(out), "--seed", "7", "--timeout", "0.5",
                        "--retries", "1", "--concurrency", "4", "--api-key-env",
                        "NO_SUCH_VARIABLE_HERE", "--quiet"]) == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["score"] for s in scores] == [85, None, None, None, 70, 90, 85]
    assert [s["index"] for s in scores] == list(range(7))
    assert all(s["error"] for s in scores if s["score"] is None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_scored"], metrics["n_failed"]) == (4, 3)
    assert metrics["mean_score"] == pytest.approx((85 + 70 + 90 + 85) / 4)
    assert sum(metrics["histogram"]["counts"]) == 4 and len(metrics["histogram"]["counts"]) == 10


def test_pairwise_ranks_three_models_and_cancels_position_bias(tmp_path, judge_server):
    instructions = ["Task 0", "Task 1", "Task 2", "BIASED task", "GARBLED task"]
    paths = [write_responses(tmp_path / f"{name}.jsonl", [f"{name} answer {i}" for i in range(5)],
                             instructions) for name in ("worst", "best", "middle")]
    out = tmp_path / "arena"
    assert run_command(["pairwise", "--responses", *map(str, paths), "--names", "w", "b", "m",
                        "--base-url", judge_server, "--model", "judge", "--out", str(out),
                        "--seed", "7", "--retries", "0", "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "pairwise.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5
    biased = [r for r in records if r["instruction"] == "BIASED task"]
    assert all(r["winner"] == "tie" and r["score_a"] == 0.5 for r in biased)
    garbled = [r for r in records if r["instruction"] == "GARBLED task"]
    assert all(r["winner"] is None and r["error"] for r in garbled)
    board = json.loads((out / "leaderboard.json").read_text())
    assert [row["model"] for row in board["models"]] == ["b", "m", "w"]
    assert [row["rank"] for row in board["models"]] == [1, 2, 3]
    for row in board["models"]:
        low, high = row["bradley_terry_ci"]
        assert low <= row["bradley_terry"] <= high
    w_vs_b = next(p for p in board["pairs"] if (p["model_a"], p["model_b"]) == ("w", "b"))
    assert (w_vs_b["wins_a"], w_vs_b["ties"], w_vs_b["wins_b"], w_vs_b["failed"]) == (0, 1, 3, 1)
    assert w_vs_b["win_rate_a"] == 0 and w_vs_b["tie_rate"] == pytest.approx(0.25)
    assert board["failed"] == 3 and board["elo"]["k"] == 4
