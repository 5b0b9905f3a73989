"""Perplexity with a sliding window: how well a model predicts a text, token by token.

    text -> ids (N,) -> windows of at most ``context`` tokens, ``stride`` apart
         -> each window scores only the targets the previous one did not
         -> total nats over N-1 targets -> mean loss, perplexity exp(loss), bits per byte

Each token (but the first, which nothing predicts) is scored exactly once, with as much context
as the window allows: at least ``context - stride`` tokens once the first window is full (the
Hugging Face "perplexity of fixed-length models" method). Bits per byte divide by the text's
UTF-8 bytes instead of its tokens, so models with different tokenizers compare.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from .. import backend
from ..tensor import no_grad


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_scored) over ids 0..num_tokens-1.

    A window feeds ids[begin:end] (at most ``context`` of them) and predicts ids[begin+1:end+1];
    only the predictions of ids first_scored..end are counted. Together the windows count every
    id 1..num_tokens-1 exactly once.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"stride {stride} should be between 1 and the context length {context}")
    windows, scored_up_to, begin = [], 0, 0  # ids 1..scored_up_to are already counted
    while scored_up_to < num_tokens - 1:
        end = min(begin + context, num_tokens - 1)
        windows.append((begin, end, scored_up_to + 1))
        scored_up_to = end
        begin += stride
    return windows


def token_logprobs(logits, targets) -> np.ndarray:
    """log p(target) for each position: logits (B, T, V), targets (B, T) -> (B, T) float64."""
    xp = backend.get_array_module(logits)
    logits = logits.astype(xp.float32, copy=False)
    peak = logits.max(axis=-1, keepdims=True)  # (B, T, 1)
    log_norm = xp.log(xp.exp(logits - peak).sum(axis=-1)) + peak[..., 0]  # (B, T)
    targets = backend.to_device(np.asarray(targets), backend.device_of(logits))
    picked = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return backend.to_numpy(picked - log_norm).astype(np.float64)


def score_ids(model, ids, stride: int | None = None, batch_size: int = 4, bar=None) -> dict:
    """Total negative log-likelihood of ``ids`` (N,) under ``model`` with a sliding window.

    Returns {"nats": total, "tokens": N-1 targets scored, "windows": count}; ``bar`` (a tqdm
    bar) advances by one per window.
    """
    ids = np.asarray(ids, dtype=np.int64)
    context = model.config.context_length
    stride = stride or max(1, context // 2)
    windows = sliding_windows(len(ids), context, stride)
    total, counted = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size]
                width = max(end - begin for begin, end, _ in batch)
                inputs = np.zeros((len(batch), width), dtype=np.int64)  # right-padded: causal
                targets = np.zeros((len(batch), width), dtype=np.int64)  # attention never
                weights = np.zeros((len(batch), width), dtype=bool)  # looks at the padding
                for row, (begin, end, first) in enumerate(batch):
                    inputs[row, :end - begin] = ids[begin:end]
                    targets[row, :end - begin] = ids[begin + 1:end + 1]
                    weights[row, first - 1 - begin:end - begin] = True  # targets first..end
                logits = model(inputs).data  # (B, T, V)
                for row in range(len(batch)):  # one row at a time: fewer (T, V) temporaries
                    logprobs = token_logprobs(logits[row:row + 1], targets[row:row + 1])
                    total -= float(logprobs[0, weights[row]].sum())
                counted += int(weights.sum())
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
    return {"nats": total, "tokens": counted, "windows": len(windows)}


def perplexity(model, tokenizer, texts, stride: int | None = None, batch_size: int = 4,
               progress: bool = False) -> dict:
    """Mean loss, perplexity and bits per byte of ``texts`` (a list of documents, each scored on
    its own; the first token of each is context only)."""
    context = model.config.context_length
    stride = stride or max(1, context // 2)
    documents = [(text, tokenizer.encode(text)) for text in texts]
    documents = [(text, ids) for text, ids in documents if len(ids) >= 2]
    nats = tokens = windows = num_bytes = 0
    total = sum(len(sliding_windows(len(ids), context, stride)) for _, ids in documents)
    with tqdm(total=total, disable=not progress, unit="window") as bar:
        for text, ids in documents:
            result = score_ids(model, ids, stride, batch_size, bar)
            nats += result["nats"]
            tokens += result["tokens"]
            windows += result["windows"]
            num_bytes += len(text.encode("utf-8"))
    if tokens == 0:
        raise ValueError("the data holds no text of two tokens or more: nothing to score")
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / num_bytes, "tokens": tokens,
            "bytes": num_bytes, "windows": windows, "documents": len(texts),
            "context_length": context, "stride": stride}
