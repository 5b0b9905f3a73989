"""Text generation: predict the next token, pick one, append it, repeat.

    prompt ids -> model -> logits of the last position (B, V)
               -> temperature -> top-k -> top-p -> sample (or argmax)  -> next ids (B,)

With a KV cache (the default) the prompt is run once ("prefill") and each later step feeds only
the newest token: every layer keeps the keys and values of earlier positions, so a step costs
one position instead of the whole sequence. Prompts of different lengths are left-padded and
the padding is masked out, so a batch gives each prompt the tokens it would get alone.

Context longer than the model's window is cropped to the last ``context_length`` tokens. With
learned absolute positions a cropped window starts again at position 0, so the cache cannot just
slide: once the window is full, each step re-runs the whole window (as without a cache).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import backend
from .tensor import no_grad


# ------------------------------------------------------------------------------ sampling
def _filtered(logits, temperature: float, top_k: int | None, top_p: float | None):
    """(probs, order): the probabilities left after temperature, top-k and top-p, not yet
    renormalised. ``order`` is None when ``probs`` are in vocabulary order; with top_p they are
    sorted most likely first and ``order`` (B, V) holds their token ids."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    xp = backend.get_array_module(logits)
    logits = logits.astype(xp.float64) / temperature
    vocab = logits.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = xp.partition(logits, -top_k, axis=-1)[:, -top_k, None]  # k-th largest per row
        logits = xp.where(logits < kth, -xp.inf, logits)
    probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    order = None
    if top_p is not None and top_p < 1.0:
        order = xp.argsort(-probs, axis=-1)  # (B, V) ids, most likely first
        probs = xp.take_along_axis(probs, order, axis=-1)
        before = xp.cumsum(probs, axis=-1) - probs  # mass of the more likely ones
        probs = xp.where(before >= top_p, 0.0, probs)  # drop a token once those above reach p
    return probs, order


def next_token_distribution(logits, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None):
    """What ``sample_next`` draws from: (B, V) probabilities in vocabulary order, each row
    summing to 1 (temperature 0: all of it on the argmax). For tables and tests; sampling
    itself never builds this array in vocabulary order."""
    xp = backend.get_array_module(logits)
    if temperature == 0:
        return (xp.arange(logits.shape[-1]) == logits.argmax(axis=-1)[:, None]).astype(xp.float64)
    probs, order = _filtered(logits, temperature, top_k, top_p)
    if order is not None:  # back from most-likely-first to vocabulary order
        probs = xp.take_along_axis(probs, xp.argsort(order, axis=-1), axis=-1)
    return probs / probs.sum(axis=-1, keepdims=True)


def sample_next(logits, rng, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None):
    """Pick one id per row of ``logits`` (B, V), on the device the logits live on.

    temperature 0 is greedy (argmax); below 1 sharpens the distribution, above 1 flattens it.
    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens
    whose probabilities add up to at least p (nucleus sampling). Then one id is drawn from what
    is left, renormalised (``next_token_distribution`` shows that distribution). ``rng`` is a
    random Generator of the logits' array module (NumPy's or CuPy's); nothing here reads the
    GPU from the host.
    """
    if temperature == 0:
        return logits.argmax(axis=-1)
    xp = backend.get_array_module(logits)
    probs, order = _filtered(logits, temperature, top_k, top_p)
    vocab = logits.shape[-1]
    cumulative = probs.cumsum(axis=-1)  # inverse-CDF sampling: one uniform number per row
    u = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]  # scaled: what is left sums to 1
    picked = xp.minimum((cumulative <= u).sum(axis=-1), vocab - 1)  # (B,) positions
    if order is None:
        return picked
    return xp.take_along_axis(order, picked[:, None], axis=-1)[:, 0]  # back to token ids


# ------------------------------------------------------------------------ decoding loop
def _left_pad(prompts) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> ids (B, T) and mask (B, T), padding on the left."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        return prompts.astype(np.int64), np.ones(prompts.shape, dtype=bool)
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position of each real token: how many real tokens come before it in its row."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def generate_tokens(model, prompts, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_token: int | None = None, seed: int | None = None,
                    use_cache: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(next_ids (B,), finished (B,))`` once per step, as soon as each step is sampled.

    Args:
        prompts: a list of token-id lists (any lengths) or an int array (B, T).
        eos_token: a sequence that samples it is finished (its later ids are meaningless).
        seed: seeds the sampler, so the same call gives the same tokens.
        use_cache: decode with a KV cache (same tokens as recomputing, much faster).
    Stops after ``max_new_tokens`` steps or when every sequence is finished.
    """
    ids, mask = _left_pad(prompts)
    xp = backend.array_module(model.device)
    rng = xp.random.default_rng(seed)  # samples are drawn where the logits are
    window = model.config.context_length
    finished = np.zeros(len(ids), dtype=bool)
    caches = None
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                if use_cache and caches is not None and caches[0].length < window:
                    # one new position per step; the cache covers the columns before it
                    keys = caches[0].length + 1
                    logits = model(ids[:, -1:], caches, _positions(mask)[:, -1:],
                                   mask[:, -keys:], last_only=True)
                else:  # prefill, no cache, or a full window: run the last `window` tokens
                    caches = model.new_kv_cache(len(ids)) if use_cache else None
                    crop_ids, crop_mask = ids[:, -window:], mask[:, -window:]
                    logits = model(crop_ids, caches, _positions(crop_mask), crop_mask,
                                   last_only=True)
                next_ids = sample_next(logits.data[:, -1, :], rng, temperature, top_k, top_p)
                next_ids = backend.to_numpy(next_ids)  # (B,): the one read per token
                if eos_token is not None:
                    next_ids = np.where(finished, eos_token, next_ids)
                    finished |= next_ids == eos_token
                ids = np.concatenate([ids, next_ids[:, None]], axis=1)
                mask = np.concatenate([mask, np.ones((len(ids), 1), dtype=bool)], axis=1)
                yield next_ids, finished.copy()
                if finished.all():
                    break
    finally:
        model.train(was_training)


def generate(model, prompts, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (the end-of-text token and what follows it left out)."""
    outputs = [[] for _ in range(len(prompts))]
    done = [False] * len(prompts)
    for next_ids, _ in generate_tokens(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                       eos_token, seed, use_cache):
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == eos_token:
                done[row] = True
            else:
                outputs[row].append(token)
    return outputs


# --------------------------------------------------------------------------------- text
def cut_at_stop(text: str, stop: tuple) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def safe_prefix_length(text: str, stop: tuple) -> int:
    """How much of ``text`` can be shown: hold back a tail that may begin a stop string, and a
    trailing replacement character (a multi-byte character not complete yet)."""
    end = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 200,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                stop: tuple | list = (), seed: int | None = None,
                use_cache: bool = True) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as it is generated.

    Ends at the tokenizer's end-of-text token or before the first stop string.
    """
    stop = tuple(stop)
    generated: list[int] = []
    shown = 0
    for next_ids, finished in generate_tokens(model, [tokenizer.encode(prompt)], max_new_tokens,
                                              temperature, top_k, top_p, tokenizer.eot_token,
                                              seed, use_cache):
        if finished[0]:
            break
        generated.append(int(next_ids[0]))
        text, stopped = cut_at_stop(tokenizer.decode(generated), stop)
        end = len(text) if stopped else safe_prefix_length(text, stop)
        if end > shown:
            yield text[shown:end]
            shown = end
        if stopped:
            return
    text, _ = cut_at_stop(tokenizer.decode(generated), stop)
    if len(text) > shown:
        yield text[shown:]


def generate_text(model, tokenizer, prompts, max_new_tokens: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, stop: tuple | list = (),
                  seed: int | None = None, use_cache: bool = True):
    """Continuations of one prompt (a str) or several (a list of str), cut at stop strings."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    outputs = generate(model, [tokenizer.encode(p) for p in batch], max_new_tokens, temperature,
                       top_k, top_p, tokenizer.eot_token, seed, use_cache)
    texts = [cut_at_stop(tokenizer.decode(ids), tuple(stop))[0] for ids in outputs]
    return texts[0] if single else texts
