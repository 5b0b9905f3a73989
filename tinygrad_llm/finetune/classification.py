"""Classification finetuning: a pretrained GPT with a new output head, one output per class.

The LM head (one logit per vocabulary token) is replaced by a small linear layer (one logit per
class) that reads the hidden state of one position -- by default the last real token, the only
position that has seen the whole text under causal attention (``pooling="mean"`` averages all
real tokens instead). Only some layers train: the head, the last block(s), or everything.

Batches are right-padded. Under causal attention a position never sees later ones, so padding
after the text cannot change the hidden state of any real token: padding never changes a
prediction (tested).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backend
from .. import functional as F
from ..checkpoint import load_checkpoint, read_jsonl, save_checkpoint
from ..loading import build_model, check_finite
from ..nn import Linear, Module
from ..tensor import Tensor, no_grad
from ..tokenizer import tokenizer_from_config
from ..trainer import EpochBatches, EpochConfig, EpochTask, Trainer

SPAM_DATA = Path(__file__).resolve().parents[1] / "assets" / "sms_spam_collection.tsv"


# ===================================================================================== data
def _column(spec):
    """A column given as a name, or as a 0-based position (digits): then the file has no header."""
    return int(spec) if isinstance(spec, int) or str(spec).isdigit() else str(spec)


def read_labeled(path, text_column="text", label_column="label") -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV, TSV or JSONL file.

    CSV/TSV columns are named by the header row, or given as 0-based positions for files
    without a header (the bundled SMS file: label 0, text 1). JSONL takes keys. A malformed row
    raises a ValueError that names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, str(text_column), str(label_column))
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    return _read_delimited(path, "," if suffix == ".csv" else "\t", _column(text_column),
                           _column(label_column))


def _read_jsonl(path: Path, text_key: str, label_key: str) -> list[tuple[str, str]]:
    rows = []
    for record, where in read_jsonl(path):
        if not isinstance(record, dict) or text_key not in record or label_key not in record:
            raise ValueError(f"{where}: expected an object with keys {text_key!r} and "
                             f"{label_key!r}")
        rows.append(_checked(str(record[text_key]), str(record[label_key]), where))
    return rows


def _read_delimited(path: Path, delimiter: str, text_col, label_col) -> list[tuple[str, str]]:
    rows = []
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # TSV: quotes are text
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        if isinstance(text_col, str) or isinstance(label_col, str):
            header = next(reader, [])
            missing = [c for c in (text_col, label_col) if isinstance(c, str) and c not in header]
            if missing:
                raise ValueError(f"{path}, line 1: the header {header} has no column "
                                 f"{' or '.join(map(repr, missing))}; name the columns with "
                                 "--text-column/--label-column (or 0-based positions)")
            text_col = header.index(text_col) if isinstance(text_col, str) else text_col
            label_col = header.index(label_col) if isinstance(label_col, str) else label_col
            width = len(header)
        else:
            width = None
        for record in reader:
            line_number = reader.line_num
            if not record:
                continue
            width = width or len(record)
            if len(record) != width or max(text_col, label_col) >= len(record):
                raise ValueError(f"{path}, line {line_number}: expected {width} fields, found "
                                 f"{len(record)}")
            where = f"{path}, line {line_number}"
            rows.append(_checked(record[text_col], record[label_col], where))
    return rows


def _checked(text: str, label: str, where: str) -> tuple[str, str]:
    if not text.strip() or not label.strip():
        raise ValueError(f"{where}: empty text or label")
    return text, label.strip()


def balance(examples: list, seed: int = 0) -> list:
    """Undersample every class to the size of the smallest one (seeded)."""
    by_label: dict = {}
    for example in examples:
        by_label.setdefault(example[1], []).append(example)
    smallest = min(len(group) for group in by_label.values())
    rng = np.random.default_rng(seed)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        kept += [group[i] for i in sorted(rng.choice(len(group), smallest, replace=False))]
    return kept


def stratified_split(examples: list, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> tuple:
    """Shuffle each class with a seed and cut it by ``fractions``: every split keeps the class
    proportions. Returns (train, validation, test)."""
    by_label: dict = {}
    for example in examples:
        by_label.setdefault(example[1], []).append(example)
    rng = np.random.default_rng(seed)
    splits = ([], [], [])
    for label in sorted(by_label):
        group = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        n_train = int(round(len(group) * fractions[0]))
        n_val = int(round(len(group) * fractions[1]))
        splits[0].extend(group[:n_train])
        splits[1].extend(group[n_train:n_train + n_val])
        splits[2].extend(group[n_train + n_val:])
    return tuple([split[i] for i in rng.permutation(len(split))] for split in splits)


def encode(examples: list, tokenizer, label_ids: dict, max_length: int) -> list:
    """(token ids truncated to max_length, label id) for each (text, label)."""
    encoded = []
    for text, label in examples:
        if label not in label_ids:
            raise ValueError(f"label {label!r} was not seen in training ({sorted(label_ids)})")
        try:
            ids = tokenizer.encode(text)[:max_length] or [0]
        except ValueError as error:  # e.g. a character outside a character vocabulary
            raise ValueError(f"cannot encode the text {text[:40]!r}: {error}") from None
        encoded.append((ids, label_ids[label]))
    return encoded


def pad_batch(token_lists: list, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: ids (B, T) and lengths (B,)."""
    lengths = np.array([len(ids) for ids in token_lists])
    batch = np.full((len(token_lists), lengths.max()), pad_id, dtype=np.int64)
    for row, ids in enumerate(token_lists):
        batch[row, :len(ids)] = ids
    return batch, lengths


def labeled_batch(chunk: list, pad_id: int = 0) -> tuple:
    """(ids (B, T), lengths (B,), labels (B,)) of encoded (ids, label) examples."""
    ids, lengths = pad_batch([c[0] for c in chunk], pad_id)
    return ids, lengths, np.array([c[1] for c in chunk])


def batches(encoded: list, batch_size: int, pad_id: int = 0):
    """Yield (ids (B, T), lengths (B,), labels (B,)) from encoded examples, in order."""
    for start in range(0, len(encoded), batch_size):
        yield labeled_batch(encoded[start:start + batch_size], pad_id)


# ==================================================================================== model
# --trainable auto trains everything in models below this size, only the last block in larger
# ones. A small body pretrained on a narrow corpus has no useful features for words it never
# saw (16% of the SMS tokens never occur in Shakespeare) and training it all is cheap; a large,
# broadly pretrained body like GPT-2 needs only its top to adapt (docs/classification.md).
AUTO_ALL_BELOW = 20_000_000


def resolve_trainable(which: str, num_params: int) -> str:
    """The concrete choice behind ``which`` ('auto' depends on the model's size)."""
    if which != "auto":
        return which
    return "all" if num_params < AUTO_ALL_BELOW else "last-block"


class GPTClassifier(Module):
    """A GPT body with a classification head: ids (B, T) + lengths (B,) -> logits (B, classes)."""

    def __init__(self, gpt, num_classes: int, pooling: str = "last"):
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        gpt.lm_head = None  # the vocabulary-sized output is replaced by the head below
        self.gpt = gpt
        self.head = Linear(gpt.config.n_embd, num_classes)
        self.pooling = pooling

    def forward(self, ids, lengths) -> Tensor:
        hidden = self.gpt.hidden_states(ids)  # (B, T, C)
        xp = backend.array_module(self.device)
        lengths = backend.to_device(np.asarray(lengths), self.device)
        if self.pooling == "last":  # the last real token of each row
            pooled = hidden[xp.arange(len(lengths)), lengths - 1]  # (B, C)
        else:  # the mean over real tokens
            real = (xp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
            pooled = (hidden * real[:, :, None]).sum(axis=1) / lengths[:, None].astype(
                hidden.dtype)
        return self.head(pooled)  # (B, C) -> (B, classes)

    def set_trainable(self, which: str) -> str:
        """Freeze all but: 'head'; 'last-block' (last block + final norm + head); 'last-N'
        (e.g. 'last-2': the last N blocks + final norm + head); or train 'all'. 'auto' picks
        'all' below 20M parameters, else 'last-block'. Returns the concrete choice."""
        which = resolve_trainable(which, self.num_params())
        if which == "all":
            self.requires_grad_(True)
            return which
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if which == "head":
            return which
        if which == "last-block":
            count = 1
        elif which.startswith("last-") and which[5:].isdigit():
            count = int(which[5:])
        else:
            raise ValueError(f"unknown --trainable {which!r}; choose auto, head, last-block, "
                             "last-N (e.g. last-2) or all")
        if not 1 <= count <= len(self.gpt.h):
            raise ValueError(f"{which}: the model has {len(self.gpt.h)} blocks")
        for block in list(self.gpt.h)[-count:]:
            block.requires_grad_(True)
        self.gpt.ln_f.requires_grad_(True)
        return which


# ================================================================================ metrics
def classification_metrics(true: np.ndarray, predicted: np.ndarray, labels: list,
                           positive: int | None = None) -> dict:
    """Accuracy, per-class precision/recall/F1, their macro averages, the confusion matrix
    (rows: true label, columns: predicted), and -- for two classes -- precision/recall/F1 of
    the positive class (default: the second label)."""
    n = len(labels)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (true, predicted), 1)
    per_class = {}
    for k, label in enumerate(labels):
        tp = confusion[k, k]
        precision = tp / confusion[:, k].sum() if confusion[:, k].sum() else 0.0
        recall = tp / confusion[k, :].sum() if confusion[k, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall),
                            "f1": float(f1), "support": int(confusion[k, :].sum())}
    result = {
        "accuracy": float(np.trace(confusion) / max(1, confusion.sum())),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if n == 2:
        positive_label = labels[1 if positive is None else positive]
        result.update({f"{k}": per_class[positive_label][k] for k in ("precision", "recall", "f1")})
        result["positive_label"] = positive_label
    return result


# =============================================================================== training
@dataclass
class ClassifierConfig(EpochConfig):
    """Classification finetuning: the shared step and loop settings, evaluated every epoch."""

    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 5e-4
    min_lr: float = 5e-5  # the end of the cosine decay
    beta2: float = 0.999
    max_length: int | None = None  # tokens per text; default: longest training text, <= window
    trainable: str = "auto"
    pooling: str = "last"
    balance: bool = True
    seed: int = 123


def evaluate(model, encoded: list, batch_size: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, predicted class ids and probabilities (N, classes) over encoded examples."""
    model.eval()
    losses, predictions, probabilities = [], [], []
    with no_grad():
        for ids, lengths, labels in batches(encoded, batch_size):
            logits = model(ids, lengths)
            losses.append(F.cross_entropy(logits, labels).item() * len(labels))
            probs = backend.to_numpy(F.softmax(logits, axis=-1).data)
            probabilities.append(probs)
            predictions.append(probs.argmax(axis=-1))
    model.train()
    return (float(np.sum(losses) / len(encoded)), np.concatenate(predictions),
            np.concatenate(probabilities))


class ClassificationTask(EpochTask):
    """Labelled texts for the shared Trainer: shuffled batches epoch after epoch; evaluation of
    loss and accuracy on the training and validation sets; the best is the most accurate on
    validation (ties: the lower validation loss)."""

    def __init__(self, train: list, val: list, config: ClassifierConfig):
        self.train, self.val = train, val
        self.batches = EpochBatches(len(train), config.batch_size, config.seed)

    def next_batch(self):
        """(ids (B, T), lengths (B,), labels (B,)); a new shuffled epoch when one runs out."""
        return labeled_batch([self.train[i] for i in self.batches.next()])

    def loss(self, model, batch):
        ids, lengths, labels = batch
        return F.cross_entropy(model(ids, lengths), labels)

    def evaluate(self, model) -> dict:
        record = {"epoch": self.epoch}
        for split, encoded in (("train", self.train), ("val", self.val)):
            loss, predicted, _ = evaluate(model, encoded)
            truth = np.array([label for _, label in encoded])
            record[f"{split}_loss"] = loss
            record[f"{split}_accuracy"] = float((predicted == truth).mean())
        return record

    def score(self, record: dict) -> tuple:
        return (record["val_accuracy"], -record["val_loss"])


def train_classifier(model: GPTClassifier, train: list, val: list, config: ClassifierConfig,
                     out_dir, show_progress: bool = False, log=print) -> Trainer:
    """Train with the shared Trainer for ``config.epochs`` epochs, evaluating after each; the
    model ends with the weights of the best validation epoch. Returns the Trainer (its
    ``history`` has one record per epoch, its ``best`` the kept one)."""
    config = config.for_data(len(train))
    trainer = Trainer(model, ClassificationTask(train, val, config), config, out_dir,
                      show_progress=show_progress, log=log)
    model.train()
    trainer.train()
    if trainer.best is not None:
        trainer.best["best"] = True
        log(f"keeping epoch {trainer.best['epoch']} (best validation accuracy)")
    return trainer


# ============================================================================= checkpoints
def save_classifier(directory, model: GPTClassifier, tokenizer, labels: list, max_length: int,
                    extra: dict | None = None) -> Path:
    config = {"model": model.gpt.config.to_dict(), "tokenizer": tokenizer.to_config(),
              "classifier": {"labels": labels, "pooling": model.pooling,
                             "max_length": max_length}, **(extra or {})}
    return save_checkpoint(directory, model.state_dict(), config)


def load_classifier(directory, device: str = "cpu"):
    """(classifier, tokenizer, labels, max_length) from a folder written by save_classifier."""
    checkpoint = load_checkpoint(directory)
    config = checkpoint["config"]
    if "classifier" not in config:
        raise ValueError(f"{directory} is not a classifier checkpoint (no 'classifier' entry in "
                         "config.json); train one with tinygrad-llm finetune-classifier")
    info = config["classifier"]
    model = GPTClassifier(build_model(config["model"], f"{directory}/config.json"),
                          len(info["labels"]), info["pooling"])
    model.load_state_dict(checkpoint["weights"])
    check_finite(model, directory)
    model.to(device)
    return model, tokenizer_from_config(config["tokenizer"]), info["labels"], info["max_length"]


def predict(model: GPTClassifier, tokenizer, texts: list[str], max_length: int,
            batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, classes) for raw texts."""
    encoded = [(tokenizer.encode(text)[:max_length] or [0], 0) for text in texts]
    return evaluate(model, encoded, batch_size)[2]


def label_counts(examples: list) -> dict:
    return dict(sorted(Counter(label for _, label in examples).items()))
