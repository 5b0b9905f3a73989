"""Pairwise comparisons and rankings: which of several models answers better?

    same instruction, answers of models i and j -> judge twice (i first, then j first)
        -> outcome for i: win / tie / loss    (position bias cancels: see ``combine``)
        -> per pair: win, tie, loss rates
        -> all games: Elo (K=4, averaged over seeded random orders) and Bradley-Terry strengths
           (MM algorithm, ties as half wins) with bootstrap confidence intervals

Both ratings are on the Elo scale (a 400-point gap: the stronger wins 10 times in 11), centred at
1000. Elo depends on the order of the games; Bradley-Terry fits all of them at once, so it is the
ranking to trust and Elo the familiar picture (docs/evaluation.md).
"""

from __future__ import annotations

import math

import numpy as np

from .judge import _run_all, judge_pair

ELO_K = 4  # LMSYS's choice: with a hundred games or more per model, a small step is stable
ELO_SCALE, ELO_BASE, ELO_START = 400.0, 10.0, 1000.0


# ------------------------------------------------------------------------- outcomes
def combine(verdict_first: str | None, verdict_second: str | None) -> float | None:
    """Model i's score from the two orders: i shown as A, then i shown as B.

    Each order gives i 1 (win), 0.5 (tie) or 0 (loss); i wins the game when it wins one order
    and does not lose the other (1 + 1 or 1 + 0.5), loses in the mirror case, and a win in one
    order with a loss in the other (position bias, or a coin flip) is a tie. None: a failed call.
    """
    if verdict_first is None or verdict_second is None:
        return None
    total = {"A": 1.0, "tie": 0.5, "B": 0.0}[verdict_first] \
        + {"B": 1.0, "tie": 0.5, "A": 0.0}[verdict_second]
    return 1.0 if total > 1 else 0.0 if total < 1 else 0.5


def judge_all_pairs(chat, names: list[str], aligned: list, concurrency: int = 4,
                    retries: int = 3, backoff: float = 1.0, progress: bool = False) -> list[dict]:
    """Every pair of models on every aligned instruction, in both orders: pairwise.jsonl records.

    ``aligned``: [(record, [answer of each model])] from ``judge.align_responses``.
    """
    calls = []  # (pair, instruction index, order): one judge call each
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    for i, j in pairs:
        for record, answers in aligned:
            calls.append((record, answers[i], answers[j]))  # i shown as A
            calls.append((record, answers[j], answers[i]))  # j shown as A
    verdicts = _run_all(lambda c: judge_pair(chat, c[0], c[1], c[2], retries, backoff), calls,
                        concurrency, progress)
    records, call = [], 0
    for i, j in pairs:
        for index, (record, _) in enumerate(aligned):
            (first, reply_first, error_first), (second, reply_second, error_second) = \
                verdicts[call], verdicts[call + 1]
            call += 2
            score = combine(first, second)
            winner = None if score is None else {1.0: names[i], 0.0: names[j]}.get(score, "tie")
            records.append({"model_a": names[i], "model_b": names[j], "index": index,
                            "instruction": record["instruction"], "input": record["input"],
                            "verdict_a_first": first, "verdict_b_first": second,
                            "reply_a_first": reply_first, "reply_b_first": reply_second,
                            "score_a": score, "winner": winner,
                            "error": error_first or error_second})
    return records


def pair_summary(records: list[dict], names: list[str]) -> list[dict]:
    """Win, tie and loss rates of model_a against model_b, for each pair (failures left out)."""
    summaries = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            games = [r for r in records if r["model_a"] == a and r["model_b"] == b]
            scores = [r["score_a"] for r in games if r["score_a"] is not None]
            n = len(scores)
            wins, ties = scores.count(1.0), scores.count(0.5)
            orders = [v for r in games for v in (r["verdict_a_first"], r["verdict_b_first"])
                      if v is not None]
            summaries.append({
                "model_a": a, "model_b": b, "n": n, "failed": len(games) - n,
                "wins_a": wins, "ties": ties, "wins_b": n - wins - ties,
                "win_rate_a": wins / n if n else None, "tie_rate": ties / n if n else None,
                "loss_rate_a": (n - wins - ties) / n if n else None,
                # how often the answer shown first won a single order: 0.5 without position bias
                "first_shown_wins": (orders.count("A") / len(orders)) if orders else None})
    return summaries


def games_of(records: list[dict], names: list[str]) -> list[tuple[int, int, float]]:
    """(i, j, score of i) for every judged game."""
    index = {name: k for k, name in enumerate(names)}
    return [(index[r["model_a"]], index[r["model_b"]], r["score_a"]) for r in records
            if r["score_a"] is not None]


# -------------------------------------------------------------------------- ratings
def elo(games: list, num_models: int, k: float = ELO_K, rounds: int = 100,
        seed: int = 0) -> np.ndarray:
    """Elo ratings (num_models,) averaged over ``rounds`` seeded random orders of ``games``."""
    rng = np.random.default_rng(seed)
    total = np.zeros(num_models)
    for _ in range(rounds):
        ratings = np.full(num_models, ELO_START)
        for g in rng.permutation(len(games)):
            i, j, score = games[g]
            expected = 1 / (1 + ELO_BASE ** ((ratings[j] - ratings[i]) / ELO_SCALE))
            ratings[i] += k * (score - expected)
            ratings[j] -= k * (score - expected)
        total += ratings
    return total / rounds


def bradley_terry(games: list, num_models: int, prior: float = 1.0, iterations: int = 10_000,
                  tolerance: float = 1e-10) -> np.ndarray:
    """Bradley-Terry ratings (num_models,) on the Elo scale, fitted by Hunter's MM algorithm.

    P(i beats j) = p_i / (p_i + p_j); a tie counts half a win for each. ``prior`` adds that many
    virtual tied games between every two models, so a model that won (or lost) everything keeps
    a finite rating. Update: p_i <- W_i / sum_j n_ij / (p_i + p_j); geometric mean fixed at 1.
    """
    wins = np.full((num_models, num_models), prior / 2)  # wins[i, j]: i's wins over j
    np.fill_diagonal(wins, 0)
    for i, j, score in games:
        wins[i, j] += score
        wins[j, i] += 1 - score
    played = wins + wins.T  # (M, M) games between i and j
    total_wins = wins.sum(axis=1)  # (M,)
    strength = np.ones(num_models)
    for _ in range(iterations):
        pair_sum = strength[:, None] + strength[None, :]  # (M, M)
        updated = total_wins / (played / pair_sum).sum(axis=1)
        updated /= np.exp(np.log(updated).mean())
        done = np.abs(updated - strength).max() < tolerance
        strength = updated
        if done:
            break
    return ELO_START + ELO_SCALE * np.log10(strength)


def bootstrap_intervals(games: list, num_models: int, samples: int = 200, seed: int = 0,
                        level: float = 0.95) -> np.ndarray:
    """(num_models, 2) percentile intervals of the Bradley-Terry ratings over games resampled
    with replacement."""
    rng = np.random.default_rng(seed)
    fits = np.array([bradley_terry([games[g] for g in rng.integers(0, len(games), len(games))],
                                   num_models) for _ in range(samples)])  # (samples, M)
    tail = 100 * (1 - level) / 2
    return np.percentile(fits, [tail, 100 - tail], axis=0).T


def leaderboard(records: list[dict], names: list[str], seed: int = 0, rounds: int = 100,
                samples: int = 200) -> dict:
    """The ranking of every model: Bradley-Terry rating and interval, Elo, wins/ties/losses."""
    games = games_of(records, names)
    if not games:
        raise ValueError("no pairwise judgement succeeded: nothing to rank")
    bt = bradley_terry(games, len(names))
    intervals = bootstrap_intervals(games, len(names), samples, seed)
    elos = elo(games, len(names), rounds=rounds, seed=seed)
    rows = []
    for m, name in enumerate(names):
        scores = [s if i == m else 1 - s for i, j, s in games if m in (i, j)]
        wins, ties = scores.count(1.0), scores.count(0.5)
        rows.append({"model": name, "bradley_terry": float(bt[m]),
                     "bradley_terry_ci": [float(intervals[m, 0]), float(intervals[m, 1])],
                     "elo": float(elos[m]), "games": len(scores), "wins": wins, "ties": ties,
                     "losses": len(scores) - wins - ties,
                     "score_rate": (wins + 0.5 * ties) / len(scores) if scores else math.nan})
    rows.sort(key=lambda r: -r["bradley_terry"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"models": rows, "pairs": pair_summary(records, names), "games": len(games),
            "elo": {"k": ELO_K, "start": ELO_START, "random_orders": rounds, "seed": seed},
            "bradley_terry": {"method": "MM (Hunter 2004), ties as half wins, one virtual tie "
                                        "per pair", "bootstrap_samples": samples,
                              "interval": 0.95, "seed": seed}}


def plot_leaderboard(board: dict, path) -> bool:
    """Bradley-Terry ratings with their intervals and Elo, one row per model, to ``path``
    (a PNG). Returns False without matplotlib (the `plot` extra)."""
    from ..plotting import _pyplot

    plt = _pyplot()
    if plt is None:
        return False
    rows = board["models"][::-1]  # best at the top
    y = np.arange(len(rows))
    bt = np.array([r["bradley_terry"] for r in rows])
    low = bt - np.array([r["bradley_terry_ci"][0] for r in rows])
    high = np.array([r["bradley_terry_ci"][1] for r in rows]) - bt
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * len(rows)))
    ax.errorbar(bt, y, xerr=[low, high], fmt="o", capsize=4, label="Bradley-Terry (95% CI)")
    ax.plot([r["elo"] for r in rows], y, "x", label=f"Elo (K={ELO_K})")
    ax.set_yticks(y, [r["model"] for r in rows])
    ax.set_xlabel("rating (Elo scale)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
