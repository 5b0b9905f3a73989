"""One optimizer step and one training loop, shared by every training command.

One optimizer step (``Trainer.train_step``):
    for each of grad_accum_steps micro-batches:  loss = task.loss(model, batch) / accum
                                                 loss.backward()      (gradients add up)
    clip the global gradient norm; set the learning rate from the schedule; AdamW step; zero.

The loop (``Trainer.train``): steps until ``max_steps``; every ``eval_interval`` steps it
evaluates, appends one line to ``metrics.jsonl``, remembers the best evaluation and saves a
checkpoint. Ctrl-C finishes the current step, saves and stops; ``resume`` continues exactly where
a checkpoint left off (the random streams are reseeded from (seed, step) before every step, so
dropout replays identically on every device).

What is being learned is a *task*, an object with these methods (pretraining's is
``LanguageModelingTask`` below, classification's in ``finetune/classification.py``):

    next_batch() -> tuple              the next micro-batch; its first array holds token ids
    loss(model, batch) -> Tensor       the scalar to minimise
    evaluate(model) -> dict            metrics, e.g. {"train_loss": ..., "val_loss": ...}
    score(record) -> tuple             higher is better: which evaluation is the best
    after_evaluation(model) -> str | None   text to show after an evaluation (a sample)
    state() -> dict, load_state(dict)  the data position, saved with checkpoints
    save(directory, model, state, optimizer)   write a checkpoint
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend
from . import functional as F
from .data import RandomWindows
from .generate import generate
from .loading import save_model
from .optim import AdamW, LossScaler, clip_grad_norm, cosine_schedule, grad_norm
from .plotting import plot_metrics
from .tensor import no_grad


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: training diverged (or the data/weights are broken)."""


@dataclass
class TrainConfig:
    """How every training command optimises: the step and the loop around it."""

    max_steps: int = 2000
    batch_size: int = 12
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak, reached after the warmup
    min_lr: float = 1e-4  # the end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled, matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_interval: int = 250
    seed: int = 1337
    keep_best: bool = False  # end with the weights of the best evaluation instead of the last
    checkpoint_every_evaluation: bool = True  # save (and so make resumable) at each evaluation
    dtype: str = "float32"  # or "float16": mixed precision (F.autocast + optim.LossScaler)

    def __post_init__(self):
        if self.dtype == "bfloat16":
            raise ValueError("dtype bfloat16 is not available: neither NumPy nor CuPy has a "
                             "bfloat16 array type; use float16 (mixed precision) or float32")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16 (mixed precision), got "
                             f"{self.dtype!r}")

    @classmethod
    def from_dict(cls, values: dict):
        """The config saved in a checkpoint (unknown keys of other versions are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class EpochConfig(TrainConfig):
    """Training by passes over a data set (the finetuning commands): the number of steps, the
    evaluation interval and the warmup follow from the data's size (``for_data``)."""

    epochs: int = 5
    warmup_fraction: float = 0.05  # of all steps, linear warmup
    eval_every_epochs: float = 1.0  # e.g. 0.5: evaluate every half epoch
    keep_best: bool = True  # end with the weights of the best evaluation
    checkpoint_every_evaluation: bool = False  # the command saves the kept weights at the end

    def for_data(self, num_examples: int):
        """The same settings with max_steps, eval_interval and warmup_steps for
        ``num_examples`` training examples."""
        steps_per_epoch = math.ceil(num_examples / self.batch_size)
        total = steps_per_epoch * self.epochs
        return replace(self, max_steps=total,
                       eval_interval=max(1, round(steps_per_epoch * self.eval_every_epochs)),
                       warmup_steps=max(1, int(total * self.warmup_fraction)))


class EpochBatches:
    """Indices of shuffled batches, epoch after epoch: a new seeded order for every epoch."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.rng = np.random.default_rng(seed)
        self.epoch, self._batches = 0, iter(())

    def next(self) -> np.ndarray:
        """The indices (B,) of the next batch (the last of an epoch may be smaller)."""
        indices = next(self._batches, None)
        if indices is None:
            self.epoch += 1
            order = self.rng.permutation(self.num_examples)
            self._batches = iter([order[i:i + self.batch_size]
                                  for i in range(0, len(order), self.batch_size)])
            indices = next(self._batches)
        return indices


class EpochTask:
    """What the finetuning tasks share: ``self.batches`` (EpochBatches) over the training
    examples, the best evaluation is the lowest validation loss, no text after an evaluation,
    and no resuming (a finetuning run is short: run it again)."""

    batches: EpochBatches
    _save = None  # the command's save function, when it checkpoints during training

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def score(self, record: dict) -> tuple:
        return (-record["val_loss"],)

    def after_evaluation(self, model) -> None:
        return None

    def state(self) -> dict:
        return {"epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        raise ValueError(f"{type(self).__name__} does not resume; run it again")

    def save(self, directory, model, state, optimizer) -> None:
        if self._save is None:
            raise NotImplementedError("this command saves the kept weights itself, at the end")
        self._save(directory, model, state, optimizer)


class Trainer:
    """Trains ``model`` on ``task`` with AdamW and writes metrics and checkpoints into out_dir."""

    def __init__(self, model, task, config: TrainConfig, out_dir, show_progress: bool = True,
                 log=None, distributed=None):
        self.model, self.task, self.config = model, task, config
        # data parallel over MPI (distributed.DataParallel): each rank trains on its rows of
        # every global batch; rank 0 alone writes metrics, samples and checkpoints
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        show_progress = show_progress and self.is_main
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.show_progress = show_progress
        self.log_line = log  # where evaluations are reported (default: above the progress bar)
        self.optimizer = AdamW(model.parameters(), lr=config.learning_rate,
                               betas=(config.beta1, config.beta2),
                               weight_decay=config.weight_decay)
        # mixed precision: float16 products (F.autocast), float32 weights, scaled loss
        self.compute_dtype = np.float16 if config.dtype == "float16" else None
        self.scaler = LossScaler() if config.dtype == "float16" else None
        self.skipped_steps = 0  # steps whose float16 gradients overflowed (not applied)
        self.step = 0
        self.history: list[dict] = []  # every evaluation's record
        self.best: dict | None = None  # the record of the best evaluation so far
        self._best_weights: dict | None = None
        self.last_text: str | None = None  # what after_evaluation showed last
        self.stop_requested = False
        self.stop_agreed = False  # under MPI: some rank's Ctrl-C, as of the last step's sums

    # ------------------------------------------------------------------------ one step
    def learning_rate(self, step: int) -> float:
        c = self.config
        return cosine_schedule(step, c.learning_rate, c.min_lr, c.warmup_steps, c.max_steps)

    def train_step(self) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss."""
        c, dp = self.config, self.distributed
        # dropout of step n is the same after a resume (and differs between ranks)
        backend.manual_seed((c.seed, self.step) if dp is None else (c.seed, self.step, dp.rank))
        scale = self.scaler.scale if self.scaler else 1.0
        total, tokens = 0.0, 0
        for _ in range(c.grad_accum_steps):
            batch = self.task.next_batch()
            tokens += batch[0].size
            share = 1.0  # this process's share of the batch's rows: its loss's weight
            if dp is not None:  # every rank drew the same global batch; take this rank's rows
                rows = dp.rows(len(batch[0]))
                share = (rows.stop - rows.start) / len(batch[0])
                batch = tuple(part[rows] for part in batch)
            with F.autocast(self.compute_dtype):
                loss = self.task.loss(self.model, batch)
            # micro-batches' (and ranks') gradients add up to the mean loss's gradient
            (loss * (scale * share / c.grad_accum_steps)).backward()
            total = total + loss.data * share  # 0-d, where the loss lives: no wait on a GPU
        params = self.optimizer.params
        if dp is not None:  # sum the ranks' gradients, losses and Ctrl-C requests
            dp.sum_gradients(params)
            total, stops = dp.sum_values([float(total), float(self.stop_requested)])
            self.stop_agreed = stops > 0  # all ranks stop after the same step
            total = backend.array_module(params[0].device).asarray(total)
        if self.scaler:
            self.scaler.unscale(params)  # the true gradients, in the float32 weights' .grad
        # the step's one read from the device: the loss and the gradients' norm together
        xp = backend.get_array_module(total)
        total, norm = (float(v) for v in backend.to_numpy(xp.stack([total, grad_norm(params)])))
        mean_loss = total / c.grad_accum_steps
        self.last_step_tokens = tokens
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad()
            raise NonFiniteLossError(
                f"the training loss became {mean_loss} at step {self.step + 1}: training "
                "diverged. Lower --lr (or raise --warmup), or check the data and the starting "
                f"weights; the last good checkpoint is in {self.checkpoint_dir}")
        if self.scaler:
            overflow = not math.isfinite(norm)  # a float16 gradient overflowed: skip the step
            self.scaler.update(overflow)
            if overflow:
                self.optimizer.zero_grad()
                self.skipped_steps += 1
                self.step += 1  # the schedule moves on, as PyTorch's does after a skipped step
                return mean_loss
        if c.grad_clip:
            clip_grad_norm(params, c.grad_clip, norm=norm)
        self.optimizer.lr = self.learning_rate(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return mean_loss

    # ---------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """The task's metrics, in eval mode and without recording a graph."""
        self.model.eval()
        try:
            with no_grad(), F.autocast(self.compute_dtype):
                metrics = self.task.evaluate(self.model)
        finally:
            self.model.train()
        bad = [name for name, value in metrics.items()
               if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise NonFiniteLossError(f"evaluation at step {self.step} gave non-finite "
                                     f"{', '.join(bad)}: training diverged")
        return metrics

    def _remember(self, record: dict) -> None:
        """Keep the record (and, with keep_best, a copy of the weights) if it is the best."""
        self.history.append(record)
        if self.best is None or self.task.score(record) > self.task.score(self.best):
            self.best = record
            if self.config.keep_best:
                self._best_weights = {name: p.data.copy()
                                      for name, p in self.model.named_parameters()
                                      if p.requires_grad}

    def restore_best(self) -> None:
        """Put back the weights of the best evaluation (``keep_best``)."""
        if self._best_weights is None:
            return
        parameters = dict(self.model.named_parameters())
        for name, data in self._best_weights.items():
            parameters[name].data = data

    # ---------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        if not self.is_main:  # the ranks' weights are identical: one writes them
            return
        state = {"step": self.step, "optimizer_steps": self.optimizer.step_count,
                 "data": self.task.state(), "train": asdict(self.config)}
        if self.scaler:
            state["loss_scaler"] = self.scaler.state_dict()
        self.task.save(self.checkpoint_dir, self.model, state, self.optimizer)

    def resume(self, checkpoint: dict) -> None:
        """Continue from a checkpoint dict (``checkpoint.load_checkpoint``) of this run."""
        state = checkpoint["state"]
        if state is None or checkpoint["optimizer"] is None:
            raise ValueError("the checkpoint has no training state to resume from (it was saved "
                             "for inference); use --init-from to start a new run from it")
        self.model.load_state_dict(checkpoint["weights"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.optimizer.step_count = state["optimizer_steps"]
        if self.scaler and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        self.step = state["step"]
        self.task.load_state(state["data"])
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
        self._write_metrics(kept)  # evaluations newer than the checkpoint will be redone
        self.history, self.best = [], None
        for record in kept:
            self._remember(record)

    def _write_metrics(self, records: list) -> None:
        if not self.is_main:
            return
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------- loop
    def train(self, until_step: int | None = None) -> dict:
        """Train to ``max_steps`` (or stop early at ``until_step``, keeping the schedule).

        Returns the last evaluation's record.
        """
        c = self.config
        stop_at = c.max_steps if until_step is None else min(until_step, c.max_steps)
        previous_handler = self._install_interrupt_handler()
        record: dict = {}
        interval_start, interval_tokens = time.perf_counter(), 0
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not self.show_progress,
                   unit="step", dynamic_ncols=True)
        write = self.log_line or bar.write
        if not self.is_main:
            write = lambda line: None  # noqa: E731  (rank 0 reports for all)
        try:
            while self.step < stop_at and not self.stopping():
                loss = self.train_step()
                interval_tokens += self.last_step_tokens
                tokens_per_s = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.lr:.2e}",
                                tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                    record = {"step": self.step, **self.evaluate(), "lr": self.optimizer.lr,
                              "tokens_per_s": tokens_per_s}
                    if self.scaler:  # float16: how the loss scale fares (overflows skip steps)
                        record.update(loss_scale=self.scaler.scale,
                                      skipped_steps=self.skipped_steps)
                    self.log(record)
                    self._remember(record)
                    write(format_record(record))
                    self.last_text = (self.task.after_evaluation(self.model) if self.is_main
                                      else None)
                    if self.last_text:
                        write(f"--- sample ---\n{self.last_text}\n--------------")
                    if c.checkpoint_every_evaluation:
                        self.save()
                    if self.is_main:
                        plot_metrics(self.history, self.out_dir / "loss.png")
                    if self.distributed is not None:  # rank 0 sampled and saved alone
                        self.distributed.barrier("waiting for rank 0's checkpoint", timeout=None)
                    interval_start, interval_tokens = time.perf_counter(), 0
            interrupted = self.stopping() or self.step == stop_at < c.max_steps
            if interrupted and c.checkpoint_every_evaluation:
                self.save()  # interrupted or stopped early: keep the exact position
                if self.stop_requested:
                    write(f"interrupted: checkpoint saved at step {self.step} in "
                          f"{self.checkpoint_dir}; continue with --resume")
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if c.keep_best:
            self.restore_best()
        return record

    def stopping(self) -> bool:
        """Ctrl-C was pressed: here, or (under MPI) on any rank by the last step's count, so
        that every rank stops after the same step."""
        return self.stop_requested if self.distributed is None else self.stop_agreed

    def _install_interrupt_handler(self):
        """First Ctrl-C: finish the step, save, stop. A second one interrupts at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            print("\nstopping after this step (Ctrl-C again to stop at once, without saving)",
                  file=sys.stderr)

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            return None


def format_record(record: dict) -> str:
    """One evaluation as a line: step 250: train_loss 2.1234, val_loss 2.2345 ..."""
    shown = [f"{k} {v:.4f}" for k, v in record.items()
             if k not in ("step", "lr", "tokens_per_s", "epoch") and isinstance(v, float)]
    epoch = f" (epoch {record['epoch']})" if "epoch" in record else ""
    return f"step {record['step']}{epoch}: " + ", ".join(shown)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a kill mid-write) is dropped with a
    warning, a damaged line elsewhere is an error that names it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError
        except ValueError:
            if number == len(lines):
                print(f"warning: {path}, line {number} is incomplete (a run was killed while "
                      "writing it); dropping it", file=sys.stderr)
                continue
            raise ValueError(f"{path}, line {number}: not a metrics record; the file is "
                             "damaged") from None
        records.append(record)
    return records


# ============================================================== pretraining's task
@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: the shared settings plus evaluation batches and the samples it shows."""

    eval_batches: int = 20  # fixed batches per split at each evaluation
    sample_prompt: str = "\n"
    sample_tokens: int = 200  # 0: no samples
    sample_temperature: float = 0.8
    sample_top_k: int = 200


class LanguageModelingTask:
    """Next-token prediction on random windows of a token array (nanoGPT's pretraining)."""

    def __init__(self, tokenizer, train_tokens, val_tokens, context_length: int,
                 config: PretrainConfig, extra: dict | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.extra = extra or {}  # more entries for the checkpoints' config.json
        self.batches = RandomWindows(train_tokens, context_length, config.batch_size,
                                     seed=config.seed)
        # evaluation always uses the same batches, so losses are comparable across steps
        self.eval_sets = {
            split: [RandomWindows(tokens, context_length, config.batch_size, seed=config.seed + k)
                    .next_batch() for _ in range(config.eval_batches)]
            for k, (split, tokens) in enumerate((("train", train_tokens), ("val", val_tokens)), 1)
        }

    def next_batch(self):
        return self.batches.next_batch()  # inputs (B, T), targets (B, T)

    def loss(self, model, batch):
        inputs, targets = batch
        return model.loss(inputs, targets)  # cross-entropy, LM head fused in

    def evaluate(self, model) -> dict:
        """Mean loss over the fixed train and validation batches."""
        return {f"{split}_loss": float(np.mean([model.loss(x, y).item() for x, y in batches]))
                for split, batches in self.eval_sets.items()}

    def score(self, record: dict) -> tuple:
        return (-record["val_loss"],)

    def after_evaluation(self, model) -> str | None:
        return self.sample(model) if self.config.sample_tokens else None

    def sample(self, model) -> str:
        c = self.config
        try:
            prompt = self.tokenizer.encode(c.sample_prompt) or [0]
        except ValueError:  # a character the corpus never had: start from the first token
            prompt = [0]
        new = generate(model, [prompt], c.sample_tokens, temperature=c.sample_temperature,
                       top_k=c.sample_top_k, eos_token=self.tokenizer.eot_token, seed=c.seed)
        return self.tokenizer.decode(prompt + new[0])

    def state(self) -> dict:
        return self.batches.state()

    def load_state(self, state: dict) -> None:
        self.batches.load_state(state)

    def save(self, directory, model, state, optimizer) -> None:
        save_model(directory, model, self.tokenizer, state, optimizer,
                   extra={"train": asdict(self.config), **self.extra})
