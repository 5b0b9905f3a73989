"""The engine's invariants: accumulation, no_grad, graph freeing, deep graphs, dtypes."""

import gc
import sys
import weakref

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import Tensor, backend, no_grad
from tinygrad_llm import functional as F
from tinygrad_llm.tensor import SliceGrad, array_on

pytestmark = pytest.mark.parametrize("device", DEVICES)


def test_two_backward_passes_accumulate(device):
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True, device=device)
    (x * x).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), 2 * 2 * np.array([1.0, 2.0, 3.0]))


def test_a_tensor_used_twice_gets_both_gradients(device):
    x = Tensor(np.array([0.5, -1.5]), requires_grad=True, device=device)
    (x * x + x * 3.0).sum().backward()  # d/dx = 2x + 3
    np.testing.assert_allclose(backend.to_numpy(x.grad), 2 * np.array([0.5, -1.5]) + 3)


def test_leaf_gradients_never_alias_each_other(device):
    a = Tensor(np.ones(3), requires_grad=True, device=device)
    b = Tensor(np.ones(3), requires_grad=True, device=device)
    (a + b).sum().backward()  # Add hands the same array to both inputs
    a.grad *= 10  # e.g. gradient clipping in place
    np.testing.assert_array_equal(backend.to_numpy(b.grad), np.ones(3))


def test_slices_of_one_tensor_and_its_other_uses_add_up(device):
    # q, k, v = x[0], x[1], x[2] hand back SliceGrads that are summed into one array; mixed
    # here with an overlapping slice, a whole-tensor use and an Add that hands one array to two
    # inputs, each checked against the gradient worked out by hand
    rng = np.random.default_rng(0)
    data, w = rng.standard_normal((3, 2, 4)), rng.standard_normal((2, 4))
    x = Tensor(data, requires_grad=True, device=device)
    weight = Tensor(w, device=device)
    q, k, v = x[0], x[1], x[2]
    total = (q * weight).sum() + (k * k).sum() + (v + v).sum() + (x[1:, :, 1:] * 3.0).sum()
    total = total + (x * x).sum() * 0.5
    total.backward()
    expected = np.zeros_like(data)
    expected[0] += w
    expected[1] += 2 * data[1]
    expected[2] += 2
    expected[1:, :, 1:] += 3
    expected += data
    np.testing.assert_allclose(backend.to_numpy(x.grad), expected, rtol=1e-12)


@pytest.mark.parametrize("indices", [(0, 1, 2), (2, -3, 1), (0, 2), (1, 1, 0), (0, 1, (2, 1)),
                                     ((0, ...), (1, slice(None)), (2, slice(None), slice(None)))])
def test_slices_of_the_first_axis_fill_the_gradient_exactly(device, indices):
    # slices x[i] that cover the first axis once each are written into an array that is not
    # zeroed first; any other set (a gap, a repeat, a narrower slice) must still see zeros and
    # sums: checked against the gradient worked out by hand, with nothing else adding to x
    rng = np.random.default_rng(1)
    data = rng.standard_normal((3, 2, 4))
    x = Tensor(data, requires_grad=True, device=device)
    expected = np.zeros_like(data)
    total = None
    for number, index in enumerate(indices):
        weight = rng.standard_normal(data[index].shape)
        term = (x[index] * Tensor(weight, device=device)).sum() * (number + 1.0)
        total = term if total is None else total + term
        expected[index] += weight * (number + 1.0)
    total.backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), expected, rtol=1e-12)


@pytest.mark.parametrize("indices, tiles", [
    ((0, 1, 2), True), ((2, -3, 1), True), ((0, ...), False), ((0, 2), False), ((1, 1, 0), False),
    (((0, ...), (1, slice(None)), (2, slice(None), slice(None))), True),
    ((0, 1, (2, 1)), False), ((0, 1, slice(2, 3)), False), ((0, 1, 2, ()), False)])
def test_which_sets_of_slices_cover_the_first_axis(device, indices, tiles):
    # the parts that may skip zeroing: x[i] (or x[i, ...], x[i, :, :]) for every i, once each
    # (the same on every device: only the indices are looked at)
    parts = [SliceGrad((3, 2, 4), np.float64, index, None) for index in indices]
    total = parts[0]
    for part in parts[1:]:
        total = total.join(part)
    assert total._tiles_first_axis() is tiles


@pytest.mark.parametrize("slice_first", [True, False])
def test_a_slice_gradient_never_changes_an_array_a_backward_returned(device, slice_first):
    # Add hands one gradient array to both of its inputs; adding a slice's gradient into t's
    # share must not change u's
    rng = np.random.default_rng(2)
    t_data, u_data = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    w, v = rng.standard_normal(3), rng.standard_normal((2, 3))
    t = Tensor(t_data, requires_grad=True, device=device)
    u = Tensor(u_data, requires_grad=True, device=device)
    sliced = (t[0] * Tensor(w, device=device)).sum()
    added = ((t + u) * Tensor(v, device=device)).sum()
    (sliced + added if slice_first else added + sliced).backward()
    expected_t = v.copy()
    expected_t[0] += w
    np.testing.assert_allclose(backend.to_numpy(t.grad), expected_t, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(u.grad), v, rtol=1e-12)


def test_the_empty_index_hands_back_the_whole_gradient(device):
    rng = np.random.default_rng(3)
    data, w = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    x = Tensor(data, requires_grad=True, device=device)
    (x[()] * Tensor(w, device=device)).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), w, rtol=1e-12)


def test_slices_of_a_permuted_view_hand_back_a_gradient_laid_out_as_its_source(device):
    # a GPT's qkv (B, T, 3C) -> (B, T, 3, H, D) -> permute -> q, k, v: the gradient reaching the
    # (B, T, 3, H, D) reshape must be C-contiguous there, so reshaping it back is a view
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2, 5, 12))
    x = Tensor(data, requires_grad=True, device=device)
    parts = x.reshape(2, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    weights = [rng.standard_normal((2, 2, 5, 2)) for _ in range(3)]
    total = sum((parts[i] * Tensor(w, device=device)).sum() for i, w in enumerate(weights))
    seen = []
    reshape_backward = F.Reshape.backward

    def watching(self, g):
        seen.append(g.flags.c_contiguous)
        return reshape_backward(self, g)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F.Reshape, "backward", watching)
        total.backward()
    expected = np.stack(weights).transpose(1, 3, 0, 2, 4).reshape(2, 5, 12)
    np.testing.assert_allclose(backend.to_numpy(x.grad), expected, rtol=1e-12)
    assert seen == [True]


def test_a_leaf_filled_from_slices_owns_its_gradient(device):
    x = Tensor(np.ones((2, 3)), requires_grad=True, device=device)
    y = Tensor(np.ones((2, 3)), requires_grad=True, device=device)
    (x[0] + y[0]).sum().backward()  # Add hands one array to both slices' backwards
    x.grad *= 10
    np.testing.assert_array_equal(backend.to_numpy(y.grad), [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [[10, 10, 10], [0, 0, 0]])


def test_slice_gradients_that_already_lie_in_one_array_are_taken_as_they_are(device):
    # concatenate's backward hands x[0] and x[1] views of one array, each where its slice lies
    # in x: on the CPU the walk takes that array as x's gradient instead of copying the parts
    # into a new one. It is also the array Add hands to y, so x's .grad must still be its own
    rng = np.random.default_rng(5)
    w = rng.standard_normal(6)
    x = Tensor(np.ones((2, 3)), requires_grad=True, device=device)
    y = Tensor(np.ones(6), requires_grad=True, device=device)
    taken = []
    dense = SliceGrad.dense

    def watching(self):
        grad = dense(self)
        taken.append(self.in_place is not None)
        return grad

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SliceGrad, "dense", watching)
        ((F.concatenate([x[0], x[1]]) + y) * Tensor(w, device=device)).sum().backward()
    assert taken == [device == "cpu"]
    x.grad *= 10
    np.testing.assert_allclose(backend.to_numpy(y.grad), w, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(x.grad), 10 * w.reshape(2, 3), rtol=1e-12)


@pytest.mark.parametrize("linear_first", [True, False])
def test_fresh_gradients_are_kept_without_a_copy_and_never_shared(device, linear_first):
    # Linear's dx, dW and db are new arrays (Function.fresh_grads): W's becomes W.grad as it is,
    # and x's is where the gradient of x's other use is added -- that one came from Add, which
    # hands the same array to z, so it must not be the one added into
    rng = np.random.default_rng(6)
    xd, zd, v, u = (rng.standard_normal(shape) for shape in [(4, 3), (4, 3), (4, 2), (4, 3)])
    wd, bd = rng.standard_normal((3, 2)), rng.standard_normal(2)
    x, z, w, b = (Tensor(a, requires_grad=True, device=device) for a in (xd, zd, wd, bd))
    returned = []
    linear_backward = F.Linear.backward

    def watching(self, g):
        grads = linear_backward(self, g)
        returned.extend(grads)
        return grads

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F.Linear, "backward", watching)
        through_linear = (F.linear(x, w, b) * Tensor(v, device=device)).sum()
        through_add = ((x + z) * Tensor(u, device=device)).sum()
        (through_linear + through_add if linear_first else through_add + through_linear
         ).backward()
    assert w.grad is returned[1] and b.grad is returned[2]
    np.testing.assert_allclose(backend.to_numpy(x.grad), v @ wd.T + u, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(z.grad), u, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(w.grad), xd.T @ v, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(b.grad), v.sum(0), rtol=1e-12)


def test_attention_inputs_that_are_broadcast_views_get_gradients_of_their_own(device):
    # q, k and v views of one array, k broadcast over the heads (a zero stride): its gradient
    # must not be laid out where k lies (every head would write one cell), as in a plain copy
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 1, 2, 3, 4))
    views = [base[0], np.ndarray((1, 2, 3, 4), base.dtype, base, base[1].ctypes.data
                                 - base.ctypes.data, (base.strides[1], 0) + base.strides[3:]),
             base[2]]  # (the middle one a view whose base is ``base`` itself)
    plain = [np.array(view) for view in views]
    g = rng.standard_normal((1, 2, 3, 4))
    grads = []
    for arrays in (views, plain):
        tensors = [Tensor(a, requires_grad=True, device=device) for a in arrays]
        F.scaled_dot_product_attention(*tensors, causal=True).backward(Tensor(g, device=device))
        grads.append([backend.to_numpy(t.grad) for t in tensors])
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_no_grad_records_nothing(device):
    x = Tensor(np.ones(3), requires_grad=True, device=device)
    with no_grad():
        y = F.gelu(x * 2.0).sum()
    assert not y.requires_grad and y._ctx is None
    z = (x * 2.0).sum()
    assert z.requires_grad and z._ctx is not None  # recording resumes after the block


def test_backward_frees_the_graph_and_its_saved_arrays(device):
    x = Tensor(np.random.default_rng(0).standard_normal(1000), requires_grad=True, device=device)
    hidden = F.exp(x)
    saved = weakref.ref(hidden._ctx.y) if device == "cpu" else None
    loss = (hidden * 2.0).sum()
    del hidden
    loss.backward()
    gc.collect()
    if saved is not None:
        assert saved() is None  # the activation that Exp saved is gone
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_retain_graph_allows_a_second_backward(device):
    x = Tensor(np.array([2.0]), requires_grad=True, device=device)
    loss = (x * x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [2 * 3 * 4.0])


def test_a_graph_of_ten_thousand_ops_does_not_recurse(device):
    x = Tensor(np.array([1.0]), requires_grad=True, device=device)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # the engine must not depend on recursion
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(backend.to_numpy(x.grad), [1.0001 ** 10_000], rtol=1e-9)


def test_dtypes_float32_by_default_float64_kept_integers_never_require_grad(device):
    assert Tensor([1.0, 2.0], device=device).dtype == np.float32
    assert Tensor(np.zeros(2), device=device).dtype == np.float64
    assert (Tensor([1.0], device=device) * 3.0).dtype == np.float32  # scalars do not upcast
    assert F.gelu(Tensor([1.0], device=device)).dtype == np.float32
    with pytest.raises(ValueError, match="floating-point"):
        Tensor(np.array([1, 2]), requires_grad=True, device=device)


def test_backward_needs_a_gradient_for_non_scalar_outputs(device):
    x = Tensor(np.ones((2, 2)), requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2.0).backward()
    (x * 2.0).backward(np.ones((2, 2)))
    np.testing.assert_array_equal(backend.to_numpy(x.grad), 2 * np.ones((2, 2)))


def test_detach_item_numpy_and_methods(device):
    x = Tensor(np.array([[1.0, 4.0], [9.0, 16.0]]), requires_grad=True, device=device)
    assert not x.detach().requires_grad
    assert x.sum().item() == 30.0
    assert isinstance(x.numpy(), np.ndarray)
    np.testing.assert_allclose(x.sqrt().numpy(), [[1, 2], [3, 4]])
    np.testing.assert_allclose((np.ones(2) + x).numpy(), x.numpy() + 1)  # NumPy on the left
    assert x.reshape(4).shape == (4,) and x.transpose().shape == (2, 2)
    assert (x > 2.0).numpy().tolist() == [[False, True], [True, True]]


def test_to_same_device_is_identity(device):
    x = Tensor(np.ones(2), device=device)
    assert x.to(device) is x


def test_comparisons_take_numpy_arrays_and_tensors(device):
    x = Tensor(np.array([1.0, 2.0, 3.0]), device=device)
    other = np.array([2.0, 2.0, 2.0])  # a NumPy array, whatever the device: moved to x's
    assert (x < other).tolist() == [True, False, False]
    assert (x <= other).tolist() == [True, True, False]
    assert (x > Tensor(other, device=device)).tolist() == [False, False, True]
    assert (x >= 2).tolist() == [False, True, True]
    assert (x < other).device == device and not (x < other).requires_grad


@pytest.mark.parametrize("operand", [np.array([1, 2]), [1, 2], Tensor(np.array([1, 2]))])
def test_array_on_moves_operands_to_the_device_and_keeps_numbers(device, operand):
    moved = array_on(operand, device)
    assert backend.get_array_module(moved) is backend.array_module(device)
    np.testing.assert_array_equal(backend.to_numpy(moved), [1, 2])
    assert array_on(2.5, device) == 2.5 and array_on(True, device) is True
