"""Work split over threads (backend.set_num_threads) gives what one thread gives."""

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from tinygrad_llm import Tensor, backend, blas
from tinygrad_llm import functional as F
from tinygrad_llm.models.gpt import GPT, GPTConfig


@pytest.fixture
def threads(monkeypatch):
    """Three threads, every array split however small; afterwards one thread and each BLAS's
    own thread count again."""
    blas.mkl()  # loaded (where installed) first: the counts below are those it leaves
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    counts = [controller.num_threads for controller in controllers]
    monkeypatch.setattr(backend, "PARALLEL_MIN_ELEMENTS", 0)
    backend.set_num_threads(3)
    yield
    backend.set_num_threads(1)
    backend._threads = 1
    for controller, count in zip(controllers, counts, strict=True):
        if controller.internal_api == "mkl":  # every thread's count, none of this one's own
            blas.mkl().MKL_Set_Num_Threads(count)
            blas.mkl().MKL_Set_Num_Threads_Local(0)
        else:  # NumPy's OpenBLAS (on one thread beside MKL, as blas.mkl() left it)
            controller.set_num_threads(count)


def test_the_helpers_cover_every_row_once(threads):
    x = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    out = np.zeros_like(x)
    seen = []

    def body(rows, into):
        seen.append(len(rows))
        into[...] = rows * 2

    backend.parallel_rows(body, x, out)
    assert sorted(seen) == [2, 2, 3] and np.array_equal(out, x * 2)
    a, b = np.random.default_rng(0).standard_normal((2, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.matmul(a, b.T), a @ b.T, rtol=1e-6)
    with pytest.raises(ZeroDivisionError):  # an error in a worker's block reaches the caller
        backend.parallel_rows(lambda rows: 1 / 0, x)


def test_set_num_threads_refuses_zero():
    with pytest.raises(ValueError, match=">= 1"):
        backend.set_num_threads(0)


def loss_and_grads(model, ids, targets):
    for p in model.parameters():
        p.grad = None
    loss = model.loss(Tensor(ids), targets)
    loss.backward()
    return loss.item(), {name: p.grad.copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_a_gpt_step_split_over_threads_equals_one_thread(threads, tie):
    # every threaded op: linear (rows of each product), GELU, layer norm, attention (the
    # sequences of the batch, with dropout and its mask drawn at once), the fused head
    config = GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=32,
                       dropout=0.1, tie_weights=tie)
    backend.manual_seed(0)
    model = GPT(config)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 50, (5, 16)), rng.integers(0, 50, (5, 16))
    targets[0, :3] = -100
    backend.manual_seed(7)
    split_loss, split_grads = loss_and_grads(model, ids, targets)
    backend._threads = 1  # the same, on one thread
    backend.manual_seed(7)
    loss, grads = loss_and_grads(model, ids, targets)
    assert split_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        np.testing.assert_allclose(split_grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


def gelu_layer_norm(x, w, b, g) -> list:
    """layer_norm(gelu(x), w, b) and the gradients of x, w, b under upstream g."""
    tensors = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    y = F.layer_norm(F.gelu(tensors[0]), tensors[1], tensors[2])
    y.backward(g)
    return [y.numpy()] + [t.grad for t in tensors]


def test_elementwise_ops_split_over_threads_equal_one_thread(threads):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 7, 9)).astype(np.float32)
    w, b = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    g = rng.standard_normal((6, 7, 9)).astype(np.float32)

    split = gelu_layer_norm(x, w, b, g)
    backend._threads = 1
    for a, b_ in zip(split, gelu_layer_norm(x, w, b, g), strict=True):
        np.testing.assert_array_equal(a, b_)  # row blocks do exactly the same arithmetic


@pytest.mark.parametrize("split", [False, True], ids=["one thread", "three threads"])
def test_cache_blocks_cover_every_row_once_and_change_no_result(split, monkeypatch, request):
    if split:
        request.getfixturevalue("threads")
    monkeypatch.setattr(backend, "CACHE_BLOCK_ELEMENTS", 40)  # blocks of 40 // 9 = 4 rows
    x = np.random.default_rng(3).standard_normal((6, 7, 9)).astype(np.float32)
    out, seen = np.zeros_like(x), []

    def body(rows, into):
        seen.append(len(rows))
        into[...] = rows * 2

    backend.parallel_rows(body, x, out, cache_blocks=True)
    assert sum(seen) == 42 and max(seen) == 4 and np.array_equal(out, x * 2)
    # GELU and layer norm (forward and backward) in blocks: the same numbers as in one piece
    w, b = np.random.default_rng(4).standard_normal((2, 9)).astype(np.float32)
    g = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)

    blocked = gelu_layer_norm(x, w, b, g)
    monkeypatch.setattr(backend, "CACHE_BLOCK_ELEMENTS", 1 << 20)  # one block
    for a, b_ in zip(blocked, gelu_layer_norm(x, w, b, g), strict=True):
        np.testing.assert_array_equal(a, b_)
