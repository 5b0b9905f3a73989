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


def test_parameters_are_named_in_definition_order():
    names = [name for name, _ in TwoLayers().named_parameters()]
    assert names == ["first.weight", "first.bias", "layers.0.weight", "layers.1.weight",
                     "layers.1.bias"]
    assert TwoLayers().num_params() == 3 * 4 + 4 + 16 + 4 + 4


def test_linear_matches_numpy():
    layer = Linear(3, 2)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x)).numpy(), x @ layer.weight.data + layer.bias.data,
                               rtol=1e-6)
    assert layer.weight.shape == (3, 2)  # (in, out), GPT-2's layout


def test_state_dict_round_trip():
    a, b = TwoLayers(), TwoLayers()
    b.load_state_dict(a.state_dict())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


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


def test_freezing_train_eval_and_dtype():
    model = TwoLayers()
    model.first.requires_grad_(False)
    assert model.num_params(trainable_only=True) == model.num_params() - 16
    model.eval()
    assert not model.drop.training and not model.layers.training
    x = Tensor(np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())  # no dropout in eval
    model.to(dtype=np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())


def test_embedding_and_norm_layers():
    table = Embedding(10, 3)
    np.testing.assert_array_equal(table(np.array([[1, 1, 9]])).numpy()[0],
                                  table.weight.data[[1, 1, 9]])
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32) * 3 + 1
    y = LayerNorm(6)(Tensor(x)).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    r = RMSNorm(6)(Tensor(x)).numpy()
    np.testing.assert_allclose(np.sqrt((r * r).mean(-1)), 1, atol=1e-3)
