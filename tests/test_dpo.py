"""DPO: the loss op, sequence log-probabilities, preference data, the guard and the command."""

import json

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import DEVICES
from hypothesis import given

from tinygrad_llm import Tensor, backend
from tinygrad_llm import functional as F
from tinygrad_llm.finetune.dpo import (
    DPOCollapseError,
    check_collapse,
    collate_pairs,
    load_preference_data,
    preference_metrics,
    sequence_logprobs,
)
from tinygrad_llm.finetune.instruction import split_examples
from tinygrad_llm.gradcheck import check_gradients
from tinygrad_llm.loading import load_model, save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import GPT2Tokenizer
from tinygrad_llm.train import cli, finetune_dpo


def reference_dpo_loss(pc, pr, rc, rr, beta=0.1):
    z = beta * ((pc - pr) - (rc - rr))
    return np.mean(np.logaddexp(0.0, -z))  # -log sigmoid(z), stable in NumPy


SMALL = st.floats(-3.0, 3.0, width=64)


def batches(elements=SMALL):
    return st.integers(1, 6).flatmap(lambda n: st.tuples(
        *[hnp.arrays(np.float64, (n,), elements=elements) for _ in range(4)]))


# ------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("device", DEVICES)
@given(values=batches(), beta=st.floats(0.05, 2.0))
def test_dpo_loss_matches_numpy_and_finite_differences(device, values, beta):
    fn = lambda *ts: F.dpo_loss(*ts, beta=beta)  # noqa: E731
    got = fn(*[Tensor(v, device=device) for v in values]).numpy()
    np.testing.assert_allclose(got, reference_dpo_loss(*values, beta), rtol=1e-9, atol=1e-12)
    check_gradients(fn, list(values), device)


@pytest.mark.parametrize("device", DEVICES)
@given(values=batches(st.floats(-1e4, 1e4, width=64)))
def test_dpo_loss_is_finite_and_exact_for_huge_margins(device, values):
    # with beta = 0.1 the margins z reach |z| ~ 1000 (exp(1000) overflows float64)
    tensors = [Tensor(v, device=device, requires_grad=True) for v in values]
    loss = F.dpo_loss(*tensors, beta=0.1)
    np.testing.assert_allclose(loss.numpy(), reference_dpo_loss(*values), rtol=1e-9, atol=1e-12)
    loss.backward()
    z = 0.1 * ((values[0] - values[1]) - (values[2] - values[3]))
    expected = -0.1 * 0.5 * (1 - np.tanh(z / 2)) / len(z)  # d/dpc = -beta sigmoid(-z) / B
    grads = [backend.to_numpy(t.grad) for t in tensors]
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(grads[0], expected, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(grads[3], expected, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(grads[1], -expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_dpo_loss_is_log_2_when_policy_equals_reference(device):
    x = Tensor(np.array([-5.0, -7.0]), device=device)
    assert F.dpo_loss(x, x * 2.0, x, x * 2.0).item() == pytest.approx(np.log(2.0))


# a shape check before any arithmetic: CPU only
def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="four"):
        F.dpo_loss(Tensor(np.zeros(2)), Tensor(np.zeros(3)), Tensor(np.zeros(2)),
                   Tensor(np.zeros(2)))


# -------------------------------------------------------------- sequence log-probabilities
def tiny_model(seed=0, device="cpu", **kwargs):
    backend.manual_seed(seed)
    config = dict(vocab_size=40, context_length=16, n_layer=1, n_head=2, n_embd=8,
                  tie_weights=False)
    return GPT(GPTConfig(**{**config, **kwargs})).to(device)


def numpy_logprobs(model, inputs, targets, average):
    logits = model(inputs).numpy().astype(np.float64)  # (B, T, V)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    counted = targets != -100
    picked = np.take_along_axis(logp, np.where(counted, targets, 0)[..., None], -1)[..., 0]
    sums = (picked * counted).sum(1)
    return sums / np.maximum(counted.sum(1), 1) if average else sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_sum_the_response_tokens_only(tie_weights, average, device):
    model = tiny_model(device=device, tie_weights=tie_weights)
    pairs = [([1, 2, 3, 4, 5], [1, 2, 3, 9], 2), ([7, 8, 9], [7, 8, 10, 11, 12, 13], 1),
             ([3, 4, 5, 6], [3, 4, 5, 30], 4)]
    inputs, targets = collate_pairs(pairs, pad_id=0, max_length=16)
    got = sequence_logprobs(model, inputs, targets, average=average)
    assert got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), numpy_logprobs(model, inputs, targets, average),
                               rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert np.abs(backend.to_numpy(model.wte.weight.grad)).sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_logprobs_give_zero_for_a_row_with_nothing_counted(device):
    model = tiny_model(device=device)
    inputs = np.array([[1, 2, 3], [4, 5, 6]])
    targets = np.array([[-100, -100, -100], [5, 6, 7]])
    got = sequence_logprobs(model, inputs, targets).numpy()
    assert got[0] == 0 and got[1] < 0


def test_preference_metrics_margin_and_accuracy():
    reference = np.zeros((3, 2))
    policy = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    m = preference_metrics(policy, reference, beta=0.5)
    assert m["reward_margin"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert m["reward_accuracy"] == pytest.approx(1 / 3)  # a zero margin is not a win
    assert m["loss"] == pytest.approx(reference_dpo_loss(policy[:, 0], policy[:, 1], 0, 0, 0.5))


# ------------------------------------------------------------------------------- data
def test_bundled_preference_data_splits_like_instruction_data():
    examples = load_preference_data()
    assert len(examples) == 1100
    assert {"chosen", "rejected", "messages", "record"} <= set(examples[0])
    splits = split_examples(examples, seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "test": 110, "val": 55}


def test_preference_data_reads_jsonl_and_names_a_bad_record(tmp_path):
    good = {"instruction": "Say hi.", "input": "", "output": "hi", "chosen": "hi",
            "rejected": "go away"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "rejected": 3}) + "\n")
    with pytest.raises(ValueError, match=r"prefs\.jsonl, line 3.*'rejected'"):
        load_preference_data(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_preference_data(path)[0]["rejected"] == "go away"
    listed = tmp_path / "prefs.json"
    listed.write_text(json.dumps([good, {"instruction": "x", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(ValueError, match=r"prefs\.json, record 2.*output"):
        load_preference_data(listed)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_preference_data(broken)


# ------------------------------------------------------------------------ collapse guard
def test_collapse_guard_stops_when_chosen_falls_while_margin_grows():
    collapsed = {"val_chosen_shift_per_token": -3.0, "val_reward_margin": 2.5}
    with pytest.raises(DPOCollapseError, match="3.00 nats per token"):
        check_collapse(collapsed, limit=1.0)
    check_collapse({**collapsed, "val_chosen_shift_per_token": -0.5}, limit=1.0)  # small drop
    check_collapse({**collapsed, "val_reward_margin": -0.1}, limit=1.0)  # margin not growing
    check_collapse(collapsed, limit=0)  # guard off


# ------------------------------------------------------------------------------ command
@pytest.fixture
def tiny_sft(tmp_path):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=64, n_layer=1, n_head=2, n_embd=16,
                          tie_weights=False))
    save_model(tmp_path / "sft", model, GPT2Tokenizer(), extra={"template": "alpaca"})
    save_model(tmp_path / "base", model, GPT2Tokenizer())
    records = [{"instruction": f"Answer {word}.", "input": "", "output": word, "chosen": word,
                "rejected": f"No way, {word} is rude!"} for word in ("yes", "no", "fine", "ok")
               * 5]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def dpo(monkeypatch, *argv):
    monkeypatch.setitem(cli.COMMANDS, "finetune-dpo", (finetune_dpo, "DPO"))
    return cli.main(["finetune-dpo", *argv])


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_dpo_raises_reward_accuracy_and_writes_its_outputs(tiny_sft, monkeypatch, device):
    out = tiny_sft / "dpo"
    assert dpo(monkeypatch, "--checkpoint", str(tiny_sft / "sft"), "--out", str(out),
               "--data", str(tiny_sft / "prefs.jsonl"), "--lr", "3e-3", "--batch-size", "4",
               "--epochs", "3", "--max-new-tokens", "4", "--collapse-limit", "0",
               "--device", device, "--quiet") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_reward_accuracy", "val_reward_margin", "test_reward_accuracy",
                "test_reward_margin", "val_loss", "test_loss", "initial_val_loss",
                "initial_test_reward_accuracy", "wall_seconds", "trainable_params",
                "total_params"):
        assert key in metrics
    assert metrics["initial_val_loss"] == pytest.approx(np.log(2.0), abs=1e-4)
    assert metrics["val_reward_margin"] > 0 and metrics["val_reward_accuracy"] > 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "val_loss", "train_reward_margin", "val_reward_accuracy"} <= \
        set(records[-1])
    responses = [json.loads(line) for line in
                 (out / "test-responses.jsonl").read_text().splitlines()]
    assert len(responses) == metrics["splits"]["test"] == 2
    assert {"instruction", "model_response", "well_formed"} <= set(responses[0])
    _, _, checkpoint = load_model(out / "checkpoint", device)
    assert checkpoint["config"]["template"] == "alpaca"


# the template check is host logic, and the cuda training path is covered by the other command
# tests: CPU only
def test_finetune_dpo_refuses_a_base_model_without_a_template(tiny_sft, monkeypatch, capsys):
    argv = ["--checkpoint", str(tiny_sft / "base"), "--data", str(tiny_sft / "prefs.jsonl"),
            "--epochs", "1", "--max-new-tokens", "2", "--quiet"]
    assert dpo(monkeypatch, *argv, "--out", str(tiny_sft / "a")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no prompt template" in error[0] and "--template" in error[0]
    assert dpo(monkeypatch, *argv, "--out", str(tiny_sft / "b"), "--template", "alpaca") == 0


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_dpo_collapse_guard_stops_the_run(tiny_sft, monkeypatch, capsys, device):
    assert dpo(monkeypatch, "--checkpoint", str(tiny_sft / "sft"), "--out",
               str(tiny_sft / "c"), "--data", str(tiny_sft / "prefs.jsonl"), "--lr", "3e-2",
               "--beta", "1", "--epochs", "4", "--batch-size", "4", "--collapse-limit", "1e-6",
               "--device", device, "--quiet") == 2
    assert "collapse guard" in capsys.readouterr().err


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_dpo_with_lora_and_averaged_logprobs_writes_an_adapter(tiny_sft, monkeypatch,
                                                                        device):
    out = tiny_sft / "lora"
    assert dpo(monkeypatch, "--checkpoint", str(tiny_sft / "sft"), "--out", str(out),
               "--data", str(tiny_sft / "prefs.jsonl"), "--lora-rank", "2", "--lr", "3e-3",
               "--average-logprobs", "--epochs", "1", "--max-new-tokens", "2",
               "--device", device, "--quiet") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] < metrics["total_params"]
    assert metrics["lora"]["rank"] == 2 and (out / "adapter").is_dir()
    assert metrics["config"]["average_logprobs"] is True
