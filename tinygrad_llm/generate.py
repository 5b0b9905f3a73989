"""Text generation: predict the next token, pick one, append it, repeat.

    ids (B, T) -> model -> logits of the last position (B, V) -> temperature -> top-k -> sample
"""

from __future__ import annotations

import numpy as np

from . import backend
from .tensor import no_grad


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int | None = None) -> np.ndarray:
    """Pick one id per row of ``logits`` (B, V); temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature  # < 1 sharpens, > 1 flattens
    if top_k is not None and top_k < logits.shape[-1]:  # keep only the k most likely tokens
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    # inverse-CDF sampling, one uniform number per row
    u = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> np.ndarray:
    """Extend ``ids`` (B, T) by ``max_new_tokens``; the context is cropped to the model's window."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    rng = np.random.default_rng(seed)
    context_length = model.config.context_length
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                logits = model(ids[:, -context_length:])  # (B, T, V)
                last = backend.to_numpy(logits.data[:, -1, :])  # (B, V)
                next_ids = sample_next(last, rng, temperature, top_k)
                ids = np.concatenate([ids, next_ids[:, None]], axis=1)
    finally:
        model.train(was_training)
    return ids
