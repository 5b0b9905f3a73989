"""AdamW, SGD, clipping, the schedule and gradient accumulation, against plain NumPy."""

import math

import numpy as np
import pytest

from tinygrad_llm import Tensor
from tinygrad_llm import functional as F
from tinygrad_llm.nn import Parameter
from tinygrad_llm.optim import SGD, AdamW, clip_grad_norm, cosine_schedule


def adamw_reference(p, grads, lr, b1, b2, eps, wd, decay):
    """The textbook AdamW update, step by step (Loshchilov & Hutter, Algorithm 2)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        if decay:
            p = p - lr * wd * p
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_the_textbook_update_and_skips_decay_on_vectors():
    rng = np.random.default_rng(0)
    matrix, vector = rng.standard_normal((3, 4)), rng.standard_normal(4)
    params = [Parameter(matrix.copy()), Parameter(vector.copy())]
    optimizer = AdamW(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(5)]
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.copy()
        optimizer.step()
    expected_matrix = adamw_reference(matrix, [g[0] for g in grads], 0.01, 0.9, 0.99, 1e-8, 0.1,
                                      decay=True)
    expected_vector = adamw_reference(vector, [g[1] for g in grads], 0.01, 0.9, 0.99, 1e-8, 0.1,
                                      decay=False)
    np.testing.assert_allclose(params[0].data, expected_matrix, rtol=1e-10)
    np.testing.assert_allclose(params[1].data, expected_vector, rtol=1e-10)


def test_adamw_state_round_trips():
    p = Parameter(np.ones((2, 2)))
    optimizer = AdamW([p])
    p.grad = np.ones((2, 2))
    optimizer.step()
    other = AdamW([Parameter(np.ones((2, 2)))])
    other.load_state_dict(optimizer.state_dict())
    np.testing.assert_array_equal(other.m[0], optimizer.m[0])
    with pytest.raises(ValueError, match="another model"):
        AdamW([Parameter(np.ones(3))]).load_state_dict(optimizer.state_dict())


def test_sgd_with_momentum():
    p = Parameter(np.array([1.0]))
    optimizer = SGD([p], lr=0.1, momentum=0.9)
    for _ in range(2):
        p.grad = np.array([1.0])
        optimizer.step()
    assert p.data[0] == pytest.approx(1 - 0.1 * 1 - 0.1 * 1.9)


def test_sgd_weight_decay_pulls_towards_zero_with_and_without_momentum():
    p = Parameter(np.array([2.0]))
    p.grad = np.zeros(1)  # no gradient: the decay alone moves p, towards 0
    SGD([p], lr=0.1, weight_decay=0.5).step()
    assert p.data[0] == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)

    # by hand, lr 0.1, momentum 0.9, weight decay 0.01: update u = g + 0.01 p, v = 0.9 v + u
    p = Parameter(np.array([1.0, -2.0]))
    optimizer = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    p.grad = np.array([0.5, 0.5])
    optimizer.step()  # u = v = [0.51, 0.48];  p = [1, -2] - 0.1 v
    np.testing.assert_allclose(p.data, [0.949, -2.048], rtol=1e-12)
    p.grad = np.array([-1.0, 2.0])
    optimizer.step()  # u = [-0.99051, 1.97952];  v = 0.9 [0.51, 0.48] + u = [-0.53151, 2.41152]
    np.testing.assert_allclose(p.data, [0.949 + 0.053151, -2.048 - 0.241152], rtol=1e-12)


def test_clip_grad_norm_scales_to_the_global_norm():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0, 0.8], rtol=1e-5)
    assert clip_grad_norm([a, b], 10.0) == pytest.approx(1.0, rel=1e-5)  # below: unchanged


def test_cosine_schedule_warms_up_then_decays_to_the_minimum():
    lr = [cosine_schedule(s, 1.0, 0.1, warmup_steps=10, total_steps=110) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr[110] == lr[119] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lr[10:], lr[11:], strict=False))


def test_accumulated_micro_batches_equal_one_big_batch():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3))
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    whole = Parameter(weight.copy())
    F.cross_entropy(Tensor(x) @ whole, y).backward()
    split = Parameter(weight.copy())
    for part in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(Tensor(x[part]) @ split, y[part]) * 0.5).backward()
    np.testing.assert_allclose(split.grad, whole.grad, rtol=1e-12)
