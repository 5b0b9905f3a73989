"""Module mechanics: parameter naming, state dicts and their error messages, freezing, modes."""

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import Tensor, backend
from tinygrad_llm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, RMSNorm


class TwoLayers(Module):
    def __init__(self):
        self.first = Linear(3, 4)
        self.layers = ModuleList([Linear(4, 4, bias=False), LayerNorm(4)])
        self.drop = Dropout(0.5)

    def forward(self, x):
        return self.drop(self.layers[1](self.layers[0](self.first(x))))


# naming and counting parameters is host bookkeeping: CPU only
def test_parameters_are_named_in_definition_order():
    names = [name for name, _ in TwoLayers().named_parameters()]
    assert names == ["first.weight", "first.bias", "layers.0.weight", "layers.1.weight",
                     "layers.1.bias"]
    assert TwoLayers().num_params() == 3 * 4 + 4 + 16 + 4 + 4


@pytest.mark.parametrize("device", DEVICES)
def test_linear_matches_numpy(device):
    layer = Linear(3, 2).to(device)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x, device=device)).numpy(),
                               x @ layer.weight.numpy() + layer.bias.numpy(), rtol=1e-6)
    assert layer.weight.shape == (3, 2)  # (in, out), GPT-2's layout


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip(device):
    a, b = TwoLayers().to(device), TwoLayers().to(device)
    b.load_state_dict(a.state_dict())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert q.device == device, name
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_moves_numpy_arrays_and_tensors_to_the_models_device(device):
    source = TwoLayers()
    model = TwoLayers().to(device)
    state = source.state_dict()  # NumPy arrays
    state["first.weight"] = Tensor(state["first.weight"])  # a Tensor on the CPU works too
    model.load_state_dict(state)
    for (name, p), (_, q) in zip(model.named_parameters(), source.named_parameters(),
                                 strict=True):
        assert backend.get_array_module(p.data) is backend.array_module(device), name
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)


# the mismatch check is host logic, done before anything is copied: CPU only
def test_load_state_dict_names_every_mismatch_and_changes_nothing():
    model = TwoLayers()
    before = model.state_dict()
    state = dict(before)
    del state["first.bias"]
    state["extra.weight"] = np.zeros(2)
    state["layers.0.weight"] = np.zeros((5, 4))
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "missing from the checkpoint: first.bias" in message
    assert "not in the model: extra.weight" in message
    assert "layers.0.weight is (5, 4) in the checkpoint but (4, 4) in the model" in message
    assert "\n" not in message  # one line
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(array, before[name])


@pytest.mark.parametrize("device", DEVICES)
def test_freezing_train_eval_and_dtype(device):
    model = TwoLayers().to(device)
    model.first.requires_grad_(False)
    assert model.num_params(trainable_only=True) == model.num_params() - 16
    model.eval()
    assert not model.drop.training and not model.layers.training
    x = Tensor(np.ones((2, 3), np.float32), device=device)
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())  # no dropout in eval
    model.to(dtype=np.float64)
    assert all(p.dtype == np.float64 and p.device == device for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_and_norm_layers(device):
    table = Embedding(10, 3).to(device)
    np.testing.assert_array_equal(table(np.array([[1, 1, 9]])).numpy()[0],
                                  table.weight.numpy()[[1, 1, 9]])
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32) * 3 + 1
    y = LayerNorm(6).to(device)(Tensor(x, device=device)).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = RMSNorm(6).to(device)(Tensor(x, device=device)).numpy()
    np.testing.assert_allclose(np.sqrt((r * r).mean(-1)), 1, atol=1e-3)
