"""Evaluation: perplexity, multiple-choice accuracy, LLM-as-judge scores and pairwise rankings.

    perplexity.py       sliding-window loss, perplexity, bits per byte
    multiple_choice.py  MMLU-style questions: letter or continuation scoring
    judge.py            an OpenAI-compatible judge: 0-100 / 1-5 scores, A/B/tie verdicts
    arena.py            win rates, Elo and Bradley-Terry ratings with bootstrap intervals
"""

from .arena import bradley_terry, combine, elo, leaderboard
from .judge import load_responses, openai_chat, parse_score, parse_verdict, score_responses
from .multiple_choice import build_prompt, evaluate_questions, load_questions
from .perplexity import perplexity, sliding_windows

__all__ = ["perplexity", "sliding_windows", "load_questions", "build_prompt",
           "evaluate_questions", "load_responses", "openai_chat", "parse_score", "parse_verdict",
           "score_responses", "combine", "elo", "bradley_terry", "leaderboard"]
