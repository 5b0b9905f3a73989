"""Direct preference optimisation (DPO): data, sequence log-probabilities and the training task.

A preference record is an instruction (Alpaca shape) with two answers, ``chosen`` and
``rejected``. The policy (the model being trained) learns to raise the log-probability of the
chosen answer relative to the rejected one, measured against a frozen reference (the starting
instruction model):

    z = beta * ((log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)))
    loss = mean(-log sigmoid(z))                                     (F.dpo_loss)

The reference never changes, so its log-probabilities are computed once, up front, and cached
per example: no second model is held and each step runs one forward pass instead of two.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import functional as F
from ..nn import Linear
from ..tensor import Tensor, no_grad
from ..trainer import EpochBatches, EpochTask
from .instruction import (
    IGNORE_INDEX,
    InstructConfig,
    Template,
    collate,
    read_records,
    to_conversation,
)

PREFERENCE_DATA = Path(__file__).resolve().parents[1] / "assets" / "preference-data.json"


class DPOCollapseError(RuntimeError):
    """The policy pushed the chosen answers' probability down sharply: a degenerate optimum."""


# ================================================================================== data
def load_preference_data(path=PREFERENCE_DATA) -> list[dict]:
    """Examples as ``{"messages", "chosen", "rejected", "record"}`` from .json or .jsonl; a
    malformed record is an error that names it (file and record or line number)."""
    examples = []
    for record, where in read_records(path):
        messages = to_conversation(record, where)
        bad = [key for key in ("chosen", "rejected") if not isinstance(record.get(key), str)
               or not record[key].strip()]
        if bad:
            raise ValueError(f"{where}: a preference record needs non-empty strings 'chosen' "
                             f"and 'rejected' (the preferred and the worse answer); missing or "
                             f"not text: {', '.join(bad)}")
        examples.append({"messages": messages, "chosen": record["chosen"],
                         "rejected": record["rejected"], "record": record})
    return examples


def encode_pair(example: dict, tokenizer, template: Template) -> tuple:
    """(chosen ids, rejected ids, prompt length): prompt + answer token ids, no end token."""
    prompt = tokenizer.encode(template.prompt(example["messages"]))
    return (prompt + tokenizer.encode(example["chosen"]),
            prompt + tokenizer.encode(example["rejected"]), len(prompt))


def collate_pairs(pairs: list, pad_id: int, max_length: int) -> tuple:
    """Chosen rows then rejected rows in one batch: inputs, targets (2B, T), response only."""
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    prompts = [p[2] for p in pairs] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the command reports cut examples once, up front
        return collate(sequences, pad_id, max_length=max_length, prompt_lengths=prompts)


# ======================================================================== log-probabilities
def sequence_logprobs(model, inputs, targets, average: bool = False) -> Tensor:
    """Sum (or mean) of log p(target) over the counted positions of each row: (B,).

    Args:
        inputs, targets: int (B, T) as ``collate`` makes them; targets equal to -100 (prompt,
            padding) are left out. A row with no counted target gets 0.
        average: divide each row's sum by its number of counted targets.
    Differentiable. Each row is ``-count * F.linear_cross_entropy`` of the hidden states of its
    counted span, so the (B, T, V) logits are never held and prompt positions skip the LM head;
    other heads go through ``F.log_softmax``.
    """
    targets = np.asarray(targets.numpy() if isinstance(targets, Tensor) else targets)
    counts = (targets != IGNORE_INDEX).sum(axis=1)  # (B,)
    head = getattr(model, "lm_head", None)
    fused = hasattr(model, "hidden_states") and (head is None or isinstance(head, Linear))
    rows = []
    if fused:
        hidden = model.hidden_states(inputs)  # (B, T, C)
        weight = model.wte.weight.T if head is None else head.weight
        bias = None if head is None else head.bias
        for i, count in enumerate(counts):
            if count == 0:
                rows.append(None)
                continue
            counted = np.flatnonzero(targets[i] != IGNORE_INDEX)
            span = slice(counted[0], counted[-1] + 1)  # the head runs on the response only
            mean_nll = F.linear_cross_entropy(hidden[i, span], weight, targets[i, span],
                                              bias)  # scalar
            rows.append(mean_nll * (-1.0 if average else -float(count)))
    else:
        logp = F.log_softmax(model(inputs), axis=-1)  # (B, T, V)
        safe = np.where(targets == IGNORE_INDEX, 0, targets)
        b, t = np.indices(targets.shape)
        picked = logp[b, t, safe] * Tensor((targets != IGNORE_INDEX).astype(np.float32),
                                           device=logp.device)  # (B, T)
        totals = picked.sum(axis=1)  # (B,)
        if average:
            totals = totals * Tensor((1.0 / np.maximum(counts, 1)).astype(np.float32),
                                     device=logp.device)
        return totals
    device = model.device if hasattr(model, "device") else "cpu"
    zero = next(r for r in rows if r is not None) * 0.0 if any(r is not None for r in rows) \
        else Tensor(np.zeros((), np.float32), device=device)
    return F.stack([zero if r is None else r for r in rows])  # (B,)


def reference_logprobs(model, pairs: list, pad_id: int, max_length: int, average: bool = False,
                       batch_size: int = 16) -> np.ndarray:
    """Log-probabilities of the chosen and rejected answers under ``model``, no graph:
    (N, 2) float64, column 0 chosen, column 1 rejected."""
    out = np.zeros((len(pairs), 2))
    was_training = getattr(model, "training", False)
    model.eval()
    with no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            inputs, targets = collate_pairs(chunk, pad_id, max_length)
            values = sequence_logprobs(model, inputs, targets, average).numpy()  # (2n,)
            out[start:start + len(chunk), 0] = values[:len(chunk)]
            out[start:start + len(chunk), 1] = values[len(chunk):]
    if was_training:
        model.train()
    return out


def response_tokens(pairs: list, max_length: int) -> np.ndarray:
    """Counted target tokens of each chosen answer after cutting to max_length (+ end token)."""
    return np.array([max(min(len(c), max_length) - max(n - 1, 0), 0)
                     for c, _, n in pairs], dtype=np.float64)


def preference_metrics(policy: np.ndarray, reference: np.ndarray, beta: float,
                       chosen_tokens=None) -> dict:
    """loss, reward_margin, reward_accuracy (and the chosen answers' mean log-probability change
    per token, nats) from (N, 2) policy and reference log-probabilities."""
    z = beta * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))  # (N,)
    metrics = {"loss": float(np.mean(np.logaddexp(0.0, -z))), "reward_margin": float(z.mean()),
               "reward_accuracy": float(np.mean(z > 0))}
    if chosen_tokens is not None:
        metrics["chosen_shift_per_token"] = float(
            (policy[:, 0] - reference[:, 0]).sum() / max(chosen_tokens.sum(), 1.0))
    return metrics


def check_collapse(metrics: dict, limit: float, prefix: str = "val_") -> None:
    """Raise DPOCollapseError when the policy's chosen answers lost more than ``limit`` nats per
    token against the reference while the reward margin grew (above its starting 0)."""
    shift = metrics[f"{prefix}chosen_shift_per_token"]
    if limit and shift < -limit and metrics[f"{prefix}reward_margin"] > 0:
        raise DPOCollapseError(
            f"DPO collapse guard: the chosen answers' log-probability fell {-shift:.2f} nats per "
            f"token below the reference's (limit {limit}) while the reward margin grew to "
            f"{metrics[f'{prefix}reward_margin']:.3f}: the policy is pushing both answers down. "
            "Lower --lr or --beta, train fewer epochs, or raise --collapse-limit")


# ================================================================================ training
@dataclass
class DPOConfig(InstructConfig):
    """DPO: the instruction finetuning settings plus beta, with DPO's smaller steps."""

    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    beta: float = 0.1
    average_logprobs: bool = False
    collapse_limit: float = 2.0  # nats per chosen token below the reference; 0: no guard
    eval_every_epochs: float = 0.25
    keep_best: bool = False


class DPOTask(EpochTask):
    """Preference pairs with cached reference log-probabilities, for the shared Trainer."""

    def __init__(self, train: list, val: list, train_ref: np.ndarray, val_ref: np.ndarray,
                 pad_id: int, config: DPOConfig, max_length: int, save=None):
        self.train, self.val, self.config = train, val, config
        self.train_ref, self.val_ref = train_ref, val_ref
        self.pad_id, self.max_length = pad_id, max_length
        sample = min(len(val), len(train))  # a fixed slice: comparable across evaluations
        self.train_sample, self.train_sample_ref = train[:sample], train_ref[:sample]
        self.batches = EpochBatches(len(train), config.batch_size, config.seed)
        self._save = save

    def next_batch(self):
        indices = self.batches.next()
        inputs, targets = collate_pairs([self.train[i] for i in indices], self.pad_id,
                                        self.max_length)
        return inputs, targets, self.train_ref[indices]

    def loss(self, model, batch):
        inputs, targets, ref = batch
        n = len(ref)
        logp = sequence_logprobs(model, inputs, targets, self.config.average_logprobs)  # (2n,)
        device = logp.device
        ref_chosen = Tensor(ref[:, 0].astype(np.float32), device=device)
        ref_rejected = Tensor(ref[:, 1].astype(np.float32), device=device)
        return F.dpo_loss(logp[:n], logp[n:], ref_chosen, ref_rejected, self.config.beta)

    def measure(self, model, pairs: list, reference: np.ndarray) -> dict:
        policy = reference_logprobs(model, pairs, self.pad_id, self.max_length,
                                    self.config.average_logprobs)
        tokens = np.ones(len(pairs)) if self.config.average_logprobs \
            else response_tokens(pairs, self.max_length)
        return preference_metrics(policy, reference, self.config.beta, tokens)

    def evaluate(self, model) -> dict:
        record = {"epoch": self.epoch}
        for name, pairs, ref in (("train", self.train_sample, self.train_sample_ref),
                                 ("val", self.val, self.val_ref)):
            record.update({f"{name}_{k}": v for k, v in self.measure(model, pairs, ref).items()})
        check_collapse(record, self.config.collapse_limit)
        return record
