"""The pretraining loop: step, accumulate, clip, schedule, evaluate, log, checkpoint, resume.

One optimizer step:
    for each of grad_accum_steps micro-batches:  loss = model.loss(x, y) / accum
                                                 loss.backward()      (gradients add up)
    clip the global gradient norm; set the learning rate from the schedule; AdamW step.

Every ``eval_interval`` steps: mean loss on fixed train and validation batches, one line in
``metrics.jsonl``, a generated sample, and a checkpoint. Ctrl-C finishes the current step, saves a
checkpoint and stops; ``resume`` continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend
from .checkpoint import save_model
from .data import RandomWindows
from .generate import generate
from .optim import AdamW, clip_grad_norm, cosine_schedule
from .plotting import plot_curves
from .tensor import no_grad


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 12
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_interval: int = 250
    eval_batches: int = 20
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    seed: int = 1337

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Trainer:
    """Trains a GPT on token arrays and writes everything into ``out_dir``."""

    def __init__(self, model, tokenizer, train_tokens, val_tokens, config: TrainConfig, out_dir,
                 show_progress: bool = True):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.show_progress = show_progress
        context = model.config.context_length
        backend.manual_seed(config.seed)  # dropout masks
        self.batches = RandomWindows(train_tokens, context, config.batch_size, seed=config.seed)
        # evaluation always uses the same batches, so losses are comparable across steps
        self.eval_sets = {
            split: [RandomWindows(tokens, context, config.batch_size, seed=config.seed + k)
                    .next_batch() for _ in range(config.eval_batches)]
            for k, (split, tokens) in enumerate((("train", train_tokens), ("val", val_tokens)), 1)
        }
        self.optimizer = AdamW(model.parameters(), lr=config.learning_rate,
                               betas=(config.beta1, config.beta2),
                               weight_decay=config.weight_decay)
        self.step = 0
        self.last_sample: str | None = None  # the text generated at the latest evaluation
        self.tokens_per_step = config.batch_size * config.grad_accum_steps * context
        self.stop_requested = False

    # ------------------------------------------------------------------------ one step
    def learning_rate(self, step: int) -> float:
        c = self.config
        return cosine_schedule(step, c.learning_rate, c.min_lr, c.warmup_steps, c.max_steps)

    def train_step(self) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss."""
        accum = self.config.grad_accum_steps
        total = 0.0
        for _ in range(accum):
            inputs, targets = self.batches.next_batch()  # (B, T), (B, T)
            loss = self.model.loss(inputs, targets)  # cross-entropy, LM head fused in
            (loss * (1.0 / accum)).backward()  # gradients of the micro-batches add up
            total += loss.item()
        if self.config.grad_clip:
            clip_grad_norm(self.optimizer.params, self.config.grad_clip)
        self.optimizer.lr = self.learning_rate(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return total / accum

    # ---------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Mean loss over the fixed train and validation batches."""
        self.model.eval()
        losses = {}
        with no_grad():
            for split, batches in self.eval_sets.items():
                values = [self.model.loss(x, y).item() for x, y in batches]
                losses[f"{split}_loss"] = float(np.mean(values))
        self.model.train()
        return losses

    def sample(self) -> str:
        try:
            prompt = self.tokenizer.encode(self.config.sample_prompt) or [0]
        except ValueError:  # a character the corpus never had: start from the first token
            prompt = [0]
        new = generate(self.model, [prompt], self.config.sample_tokens, temperature=0.8, top_k=200,
                       eos_token=self.tokenizer.eot_token, seed=self.config.seed)
        return self.tokenizer.decode(prompt + new[0])

    # ---------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        state = {
            "step": self.step,
            "optimizer_steps": self.optimizer.step_count,
            "rng": backend.get_rng_state(),
            "batches": self.batches.state(),
            "train": asdict(self.config),
        }
        save_model(self.checkpoint_dir, self.model, self.tokenizer, state, self.optimizer,
                   extra={"train": asdict(self.config)})

    def resume(self, checkpoint: dict) -> None:
        """Continue from a checkpoint dict (``checkpoint.load_checkpoint``) of this run."""
        state = checkpoint["state"]
        if state is None or checkpoint["optimizer"] is None:
            raise ValueError("the checkpoint has no training state to resume from (it was saved "
                             "for inference); use --init-from to start a new run from it")
        self.model.load_state_dict(checkpoint["weights"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.optimizer.step_count = state["optimizer_steps"]
        self.step = state["step"]
        backend.set_rng_state(state["rng"])
        self.batches.load_state(state["batches"])
        self._drop_metrics_after(self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """Forget logged evaluations newer than the checkpoint (they will be redone)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
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
        try:
            while self.step < stop_at and not self.stop_requested:
                loss = self.train_step()
                interval_tokens += self.tokens_per_step
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_tokens / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.lr:.2e}",
                                tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                    record = {"step": self.step, **self.evaluate(), "lr": self.optimizer.lr,
                              "tokens_per_s": tokens_per_s}
                    self.log(record)
                    bar.write(f"step {self.step}: train loss {record['train_loss']:.4f}, "
                              f"val loss {record['val_loss']:.4f}")
                    if c.sample_tokens:
                        self.last_sample = self.sample()
                        bar.write(f"--- sample ---\n{self.last_sample}\n--------------")
                    self.save()
                    plot_metrics(self.metrics_path, self.out_dir / "loss.png")
                    interval_start, interval_tokens = time.perf_counter(), 0
            if self.stop_requested or self.step == stop_at < c.max_steps:
                self.save()  # interrupted or stopped early: keep the exact position
                if self.stop_requested:
                    bar.write(f"interrupted: checkpoint saved at step {self.step} in "
                              f"{self.checkpoint_dir}; continue with --resume")
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        return record

    def _install_interrupt_handler(self):
        """First Ctrl-C: finish the step, save, stop. A second one interrupts at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            return None


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path, png_path) -> bool:
    """Draw train/validation loss against step; False (and nothing drawn) without matplotlib."""
    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    curves = {split: (steps, [r[f"{split}_loss"] for r in records]) for split in ("train", "val")}
    return bool(records) and plot_curves(png_path, "step",
                                         {"cross-entropy loss (nats per token)": curves})
