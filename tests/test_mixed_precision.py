"""Mixed precision: float16 matrix products with float32 weights and dynamic loss scaling."""

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import Tensor, backend
from tinygrad_llm import functional as F
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.nn import Parameter
from tinygrad_llm.optim import LossScaler
from tinygrad_llm.tokenizer import CharTokenizer
from tinygrad_llm.trainer import LanguageModelingTask, PretrainConfig, Trainer, read_metrics

TEXT = "to be or not to be, that is the question. " * 60
TOKENIZER = CharTokenizer.from_text(TEXT)
TOKENS = np.array(TOKENIZER.encode(TEXT), dtype=np.uint16)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_under_autocast_multiplies_in_float16_and_returns_float32_gradients(device):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    w = (rng.standard_normal((16, 8)) * 0.2).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    g = rng.standard_normal((3, 5, 8)).astype(np.float32)
    tx, tw, tb = (Tensor(a, requires_grad=True, device=device) for a in (x, w, b))
    with F.autocast(np.float16):
        y = F.linear(tx, tw, tb)
    y.backward(g)
    assert y.dtype == np.float16
    assert (tx.grad.dtype, tw.grad.dtype, tb.grad.dtype) == (np.float32,) * 3
    # the reference: the same products in float16 by NumPy, with float32 sums for the bias
    x16, w16, g16 = x.astype(np.float16), w.astype(np.float16), g.astype(np.float16)
    np.testing.assert_allclose(y.numpy(), x16 @ w16 + b.astype(np.float16), rtol=2e-3,
                               atol=2e-3)
    np.testing.assert_allclose(backend.to_numpy(tx.grad), g16 @ w16.T, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(backend.to_numpy(tw.grad),
                               x16.reshape(-1, 16).T @ g16.reshape(-1, 8), rtol=3e-3, atol=3e-3)
    np.testing.assert_allclose(backend.to_numpy(tb.grad), g.reshape(-1, 8).sum(0), rtol=1e-3,
                               atol=1e-3)
    with F.autocast(np.float16), F.autocast(None):  # switched off again inside
        assert F.linear(tx, tw, tb).dtype == np.float32


def test_loss_scaler_halves_on_overflow_and_grows_after_a_run_of_good_steps():
    scaler = LossScaler(scale=1024.0, growth_interval=3)
    p = Parameter(np.zeros(2, np.float32))
    p.grad = np.array([512.0, -2048.0], np.float32)
    scaler.unscale([p])
    np.testing.assert_array_equal(p.grad, [0.5, -2.0])
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    for _ in range(2):
        scaler.update(overflow=False)
    assert scaler.scale == 512.0  # two good steps: not yet
    scaler.update(overflow=False)
    assert scaler.scale == 1024.0 and scaler.good_steps == 0
    restored = LossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.good_steps) == (1024.0, 0)


def make_trainer(out, device, dtype, **overrides):
    backend.manual_seed(0)
    config = PretrainConfig(**{"max_steps": 30, "batch_size": 8, "learning_rate": 1e-2,
                               "warmup_steps": 3, "eval_interval": 10, "eval_batches": 2,
                               "sample_tokens": 0, "seed": 0, "dtype": dtype, **overrides})
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, context_length=16, n_layer=2,
                          n_head=2, n_embd=32)).to(device)
    task = LanguageModelingTask(TOKENIZER, TOKENS[:2000], TOKENS[2000:], 16, config)
    return Trainer(model, task, config, out, show_progress=False, log=lambda line: None)


# the stated tolerance: every logged float16 loss within 2% of the float32 run's
FLOAT16_LOSS_TOLERANCE = 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_float16_training_tracks_float32_losses(tmp_path, device):
    runs = {}
    for dtype in ("float32", "float16"):
        trainer = make_trainer(tmp_path / dtype, device, dtype)
        trainer.train()
        runs[dtype] = read_metrics(tmp_path / dtype / "metrics.jsonl")
        assert trainer.model.wte.weight.dtype == np.float32  # the master weights stay float32
    assert runs["float16"][-1]["val_loss"] < runs["float16"][0]["val_loss"] - 0.3  # it learns
    for full, mixed in zip(runs["float32"], runs["float16"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert mixed[key] == pytest.approx(full[key], rel=FLOAT16_LOSS_TOLERANCE)


def test_an_overflowing_step_is_skipped_and_the_run_goes_on(tmp_path):
    trainer = make_trainer(tmp_path, "cpu", "float16", max_steps=4)
    trainer.scaler.scale = 1e30  # float16 gradients overflow at this scale
    before = {n: p.data.copy() for n, p in trainer.model.named_parameters()}
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point here
        trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.scaler.scale == 5e29
    for name, p in trainer.model.named_parameters():
        np.testing.assert_array_equal(p.data, before[name])  # nothing was applied
    trainer.scaler.scale = 2.0 ** 10
    trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.step == 2


def test_bfloat16_and_unknown_dtypes_are_clear_errors():
    with pytest.raises(ValueError, match="bfloat16 array type"):
        PretrainConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match="float32 or float16"):
        PretrainConfig(dtype="float8")


def test_pretrain_dtype_float16_saves_its_loss_scale_and_resumes(tmp_path):
    from tinygrad_llm.checkpoint import load_checkpoint
    from tinygrad_llm.train.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16",
            "--batch-size", "2", "--eval-interval", "2", "--eval-batches", "1",
            "--sample-tokens", "0", "--quiet", "--data", str(corpus), "--out", str(out)]
    assert main(["pretrain", "--steps", "2", "--dtype", "float16", *tiny]) == 0
    saved = load_checkpoint(out / "checkpoint")
    assert saved["config"]["train"]["dtype"] == "float16"
    assert saved["state"]["loss_scaler"] == {"scale": 2.0 ** 16, "good_steps": 2}
    assert main(["pretrain", "--steps", "4", "--resume", *tiny]) == 0  # stays float16
    saved = load_checkpoint(out / "checkpoint")
    assert saved["state"]["loss_scaler"]["good_steps"] == 4


def test_cross_entropy_of_float16_logits_is_computed_in_float32():
    # 2,048 positions x 50,257 classes: float16's sum of the exponentials would overflow
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((2048, 50257)) * 3).astype(np.float16)
    targets = rng.integers(0, 50257, 2048)
    tensor = Tensor(logits, requires_grad=True)
    loss = F.cross_entropy(tensor, targets)
    reference = F.cross_entropy(Tensor(logits.astype(np.float32)), targets).item()
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(reference, rel=1e-6)
    loss.backward()
    assert tensor.grad.dtype == np.float16 and np.isfinite(tensor.grad).all()
