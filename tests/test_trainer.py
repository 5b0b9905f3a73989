"""The training loop: it learns, logs, resumes exactly, and stops cleanly on Ctrl-C."""

import os
import signal

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend
from tinygrad_llm.checkpoint import load_checkpoint
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer
from tinygrad_llm.trainer import (
    LanguageModelingTask,
    NonFiniteLossError,
    PretrainConfig,
    Trainer,
    read_metrics,
)

TEXT = "to be or not to be, that is the question. " * 40
TOKENIZER = CharTokenizer.from_text(TEXT)
TOKENS = np.array(TOKENIZER.encode(TEXT), dtype=np.uint16)
MODEL = GPTConfig(vocab_size=TOKENIZER.vocab_size, context_length=16, n_layer=1, n_head=2,
                  n_embd=16, dropout=0.1)


def make_trainer(out_dir, device="cpu", **overrides):
    backend.manual_seed(0)
    config = PretrainConfig(**{"max_steps": 8, "batch_size": 4, "grad_accum_steps": 2,
                               "learning_rate": 3e-3, "warmup_steps": 2, "eval_interval": 2,
                               "eval_batches": 2, "sample_tokens": 8, "seed": 0, **overrides})
    task = LanguageModelingTask(TOKENIZER, TOKENS[:1500], TOKENS[1500:], MODEL.context_length,
                                config)
    return Trainer(GPT(MODEL).to(device), task, config, out_dir, show_progress=False,
                   log=lambda line: None)


@pytest.mark.parametrize("device", DEVICES)
def test_training_lowers_the_loss_and_logs_every_evaluation(tmp_path, device):
    trainer = make_trainer(tmp_path, device, max_steps=40, eval_interval=10, learning_rate=1e-2)
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert set(records[0]) == {"step", "train_loss", "val_loss", "lr", "tokens_per_s"}
    assert records[-1]["val_loss"] < records[0]["val_loss"] < np.log(TOKENIZER.vocab_size)
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


def losses(path):
    return [(r["step"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_metrics(path)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, device):
    make_trainer(tmp_path / "straight", device).train()

    make_trainer(tmp_path / "split", device).train(until_step=5)  # stops between evaluations
    backend.manual_seed(12345)  # whatever the generators did in between does not matter
    resumed = make_trainer(tmp_path / "split", device)
    resumed.resume(load_checkpoint(tmp_path / "split" / "checkpoint"))
    assert resumed.step == 5
    resumed.train()
    assert losses(tmp_path / "split" / "metrics.jsonl") == \
        losses(tmp_path / "straight" / "metrics.jsonl")


@pytest.mark.parametrize("device", DEVICES)
def test_ctrl_c_finishes_the_step_and_saves(tmp_path, device):
    trainer = make_trainer(tmp_path, device)
    original_step = trainer.train_step

    def step_then_interrupt():
        loss = original_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the trainer's handler
        return loss

    trainer.train_step = step_then_interrupt
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job
    trainer.train()
    assert trainer.step == 3 and trainer.stop_requested
    assert load_checkpoint(tmp_path / "checkpoint")["state"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


@pytest.mark.parametrize("device", DEVICES)
def test_resuming_from_an_inference_checkpoint_is_refused(tmp_path, device):
    from tinygrad_llm.loading import save_model

    trainer = make_trainer(tmp_path, device)
    save_model(tmp_path / "plain", trainer.model, TOKENIZER)
    with pytest.raises(ValueError, match="no training state"):
        trainer.resume(load_checkpoint(tmp_path / "plain"))


@pytest.mark.parametrize("device", DEVICES)
def test_every_step_reseeds_every_device_from_seed_and_step(tmp_path, device):
    # dropout masks come from the generators of the model's device; deriving them from
    # (seed, step) is what makes a resume exact on a GPU too, whose state is never saved
    trainer = make_trainer(tmp_path, device)
    trainer.train_step()
    trainer.train_step()
    assert backend._seed == backend._seed_int((0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_loss_stops_training_with_a_message(tmp_path, device):
    trainer = make_trainer(tmp_path, device, learning_rate=1e-3)
    trainer.model.wte.weight.data[:] = np.nan
    with pytest.raises(NonFiniteLossError, match="diverged"):
        trainer.train()


# reading metrics.jsonl is host logic: CPU only
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "val_loss": 1.0}\n{"step": 4, "val_lo')
    assert read_metrics(path) == [{"step": 2, "val_loss": 1.0}]
    assert "incomplete" in capsys.readouterr().err
    path.write_text('{"step": 2}\ngarbage\n{"step": 4}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
