"""The GPT: GPT-2's sizes, causality, initialisation, and a whole-model gradient check."""

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import Tensor, backend
from tinygrad_llm import functional as F
from tinygrad_llm.models.gpt import GPT, GPTConfig, preset

TINY = GPTConfig(vocab_size=11, context_length=8, n_layer=2, n_head=2, n_embd=8)


# parameter counts are host bookkeeping: CPU only
def test_gpt2_preset_has_gpt2s_parameter_count():
    assert GPT(preset("gpt2")).num_params() == 124_439_808  # with the tied head


def test_untied_head_adds_a_vocab_by_width_matrix():
    tied = GPT(TINY).num_params()
    untied = GPT(GPTConfig(**{**TINY.to_dict(), "tie_weights": False})).num_params()
    assert untied - tied == 11 * 8


@pytest.mark.parametrize("device", DEVICES)
def test_logits_shape_and_causality(device):
    backend.manual_seed(0)
    model = GPT(TINY).to(device)
    ids = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    logits = model(ids).numpy()
    assert logits.shape == (2, 5, 11)
    changed = ids.copy()
    changed[:, 3:] = 0  # change the future: earlier positions must not notice
    np.testing.assert_allclose(model(changed).numpy()[:, :3], logits[:, :3], rtol=1e-5)
    assert not np.allclose(model(changed).numpy()[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("device", DEVICES)
def test_too_long_input_is_a_clear_error(device):
    with pytest.raises(ValueError, match="longer than the model's context length 8"):
        GPT(TINY).to(device)(np.zeros((1, 9), dtype=np.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_id", [11, 50_000, -1])
def test_out_of_range_token_ids_are_a_clear_error(bad_id, device):
    """NumPy raises on some of these and wraps negative ids; CuPy wraps them all: so ids are
    checked on the host, before they reach any device."""
    ids = np.array([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=f"token id {bad_id} is outside the model's vocabulary of "
                                         r"11 tokens \(ids must be in 0\.\.10\)"):
        GPT(TINY).to(device)(ids)
    with pytest.raises(ValueError, match=f"token id {bad_id}"):
        # a host Tensor: ids already on a GPU are not checked (that would cost a device sync)
        GPT(TINY).to(device).loss(Tensor(ids), np.zeros((1, 3), dtype=np.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_positions_and_targets_are_a_clear_error(device):
    model = GPT(TINY).to(device)
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"position 8 is outside the model's 8 positions"):
        model(ids, positions=np.array([[6, 7, 8]]))
    with pytest.raises(ValueError, match="target 11 is out of range for 11 classes"):
        model.loss(ids, np.array([[0, 11, 2]]))
    model.loss(ids, np.array([[0, -100, 10]]))  # ignore_index and the last class are fine


@pytest.mark.parametrize("device", DEVICES)
def test_residual_projections_are_scaled_at_init(device):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, n_layer=8, n_head=4,
                          n_embd=64)).to(device)
    block = model.h[0]
    assert np.std(block.mlp.c_fc.weight.numpy()) == pytest.approx(0.02, rel=0.05)
    assert np.std(block.attn.c_attn.weight.numpy()) == pytest.approx(0.02, rel=0.05)
    # the two projections that write into the residual stream: 0.02 / sqrt(2 n_layer)
    assert np.std(block.mlp.c_proj.weight.numpy()) == pytest.approx(0.02 / 4, rel=0.05)
    assert np.std(block.attn.c_proj.weight.numpy()) == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_gradient_matches_finite_differences(device):
    """A tiny GPT in float64: d loss / d (random parameter entries) against central differences."""
    backend.manual_seed(0)
    config = GPTConfig(**{**TINY.to_dict(), "tie_weights": True, "dropout": 0.0})
    model = GPT(config).to(device, dtype=np.float64)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    F.cross_entropy(model(ids), targets).backward()
    for name, parameter in model.named_parameters():
        flat = parameter.data.reshape(-1)
        for j in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            def loss_at(value, j=j, flat=flat):
                original = float(flat[j])  # a copy (CuPy's flat[j] is a view)
                flat[j] = value
                try:
                    return F.cross_entropy(model(ids), targets).item()
                finally:
                    flat[j] = original

            h = 1e-6
            numeric = (loss_at(float(flat[j]) + h) - loss_at(float(flat[j]) - h)) / (2 * h)
            analytic = backend.to_numpy(parameter.grad).reshape(-1)[j]
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_cross_entropy_of_the_logits(tie, device):
    backend.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.to_dict(), "tie_weights": tie})).to(device, dtype=np.float64)
    rng = np.random.default_rng(2)
    ids, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    targets[0, 0] = -100
    F.cross_entropy(model(ids), targets).backward()
    expected = {name: backend.to_numpy(p.grad).copy() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model.loss(ids, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(model(ids), targets).item(), rel=1e-12)
    loss.backward()
    for name, parameter in model.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(parameter.grad), expected[name], rtol=1e-9,
                                   atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_the_causal_mask_is_cached_by_the_model_and_gives_the_uncached_result(device):
    backend.manual_seed(0)
    model = GPT(TINY).to(device)
    ids = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    logits = model(ids).numpy()
    assert list(model.causal_masks.masks) == [(device, 4, 4, np.dtype(np.float32).str)]
    mask = model.causal_masks.get(4, 4, device, np.float32)
    model(ids)
    assert model.causal_masks.get(4, 4, device, np.float32) is mask  # built once, reused
    # each block's attention called on its own builds the causal mask itself: same numbers
    x = model.wte(ids) + model.wpe(np.arange(4))
    for block in model.h:
        x = block(x)
    np.testing.assert_allclose(F.linear(model.ln_f(x), model.wte.weight.T).numpy(), logits,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_numpy_ids_positions_and_padding_mask_work_on_every_device(device):
    backend.manual_seed(0)
    model = GPT(TINY).to(device)
    ids = np.array([[0, 5, 6], [7, 8, 9]])
    padding = np.array([[False, True, True], [True, True, True]])  # row 0 is left-padded
    positions = np.array([[0, 0, 1], [0, 1, 2]])
    logits = model(ids, positions=positions, padding_mask=padding).numpy()
    alone = model(ids[:1, 1:]).numpy()  # row 0 without its padding
    np.testing.assert_allclose(logits[0, 1:], alone[0], rtol=1e-4, atol=1e-5)
