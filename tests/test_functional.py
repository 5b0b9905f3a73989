"""Every differentiable op: forward against a NumPy reference, backward against finite
differences in float64 under a random upstream gradient (hypothesis draws shapes and values).

Kinks are avoided by construction: ReLU inputs stay away from 0, max inputs have no ties,
log/sqrt/div denominators stay positive.
"""

import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import DEVICES
from hypothesis import given

from tinygrad_llm import Tensor, backend, no_grad
from tinygrad_llm import functional as F
from tinygrad_llm.gradcheck import check_gradients

pytestmark = pytest.mark.parametrize("device", DEVICES)

FINITE = st.floats(-2.0, 2.0, allow_nan=False, width=64)
POSITIVE = st.floats(0.2, 3.0, width=64)


def arrays(shape, elements=FINITE, **kwargs):
    return hnp.arrays(np.float64, shape, elements=elements, **kwargs)


def shapes(min_dims=1, max_dims=3, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)


def away_from_zero(x, margin=0.05):
    """Push values out of (-margin, margin), keeping their sign (0 goes up)."""
    return np.where(x >= 0, np.maximum(x, margin), np.minimum(x, -margin))


def forward(fn, arrays_, device):
    return fn(*[Tensor(a, device=device) for a in arrays_]).numpy()


def assert_op(fn, reference, arrays_, device, wrt=None, atol=1e-10):
    """Forward equals the NumPy reference, and backward equals finite differences."""
    np.testing.assert_allclose(forward(fn, arrays_, device), reference(*arrays_),
                               rtol=1e-9, atol=atol)
    check_gradients(fn, list(arrays_), device, wrt=wrt)


# ------------------------------------------------------------------------- binary ops
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data())
def test_binary_op_broadcasts_and_matches_finite_differences(device, name, data):
    (shape_a, shape_b), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=3, max_side=3))
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b))
    fn, reference = BINARY[name]
    assert_op(fn, reference, [a, b], device)


@given(data=st.data())
def test_div_broadcasts_and_matches_finite_differences(device, data):
    (shape_a, shape_b), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=3, max_side=3))
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b, POSITIVE))
    assert_op(lambda x, y: x / y, np.divide, [a, b], device)


@given(x=arrays(shapes()), scalar=st.floats(-3, 3).filter(lambda s: abs(s) > 0.1))
def test_python_scalars_on_either_side(device, x, scalar):
    assert_op(lambda t: (scalar - t) * scalar / (t * t + 1.0) + scalar,
              lambda a: (scalar - a) * scalar / (a * a + 1.0) + scalar, [x], device)


@given(data=st.data())
def test_matmul_batched_with_broadcast_batch_dims(device, data):
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    (batch_a, batch_b), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    a = data.draw(arrays(batch_a + (n, k)))
    b = data.draw(arrays(batch_b + (k, m)))
    assert_op(lambda x, y: x @ y, np.matmul, [a, b], device)


@given(data=st.data())
def test_matmul_with_vectors(device, data):
    k, m = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    left = data.draw(st.booleans())
    vector = data.draw(arrays((k,)))
    matrix = data.draw(arrays((2, k, m) if left else (2, m, k)))
    pair = [vector, matrix] if left else [matrix, vector]
    assert_op(lambda x, y: x @ y, np.matmul, pair, device)


@given(data=st.data(), with_bias=st.booleans())
def test_linear_is_x_at_w_plus_b(device, data, with_bias):
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=3))
    n_in, n_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x, w = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_in, n_out)))
    if with_bias:
        b = data.draw(arrays((n_out,)))
        assert_op(F.linear, lambda x_, w_, b_: x_ @ w_ + b_, [x, w, b], device)
    else:
        assert_op(F.linear, lambda x_, w_: x_ @ w_, [x, w], device)


# -------------------------------------------------------------------------- unary ops
def gelu_reference(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


UNARY = {
    "neg": (lambda t: -t, np.negative, FINITE),
    "exp": (F.exp, np.exp, FINITE),
    "log": (F.log, np.log, POSITIVE),
    "sqrt": (F.sqrt, np.sqrt, POSITIVE),
    "tanh": (F.tanh, np.tanh, st.floats(-4, 4, width=64)),
    "gelu": (F.gelu, gelu_reference, st.floats(-4, 4, width=64)),
    "silu": (F.silu, lambda x: x / (1 + np.exp(-x)), st.floats(-6, 6, width=64)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@given(data=st.data())
def test_unary_op_matches_reference_and_finite_differences(device, name, data):
    fn, reference, elements = UNARY[name]
    assert_op(fn, reference, [data.draw(arrays(shapes(), elements))], device)


@given(x=arrays(shapes()))
def test_relu_away_from_its_kink(device, x):
    assert_op(F.relu, lambda a: np.maximum(a, 0), [away_from_zero(x)], device)


@given(x=arrays(shapes(), POSITIVE), exponent=st.sampled_from([2, 3, 0.5, -1, 1.5, -2.5, 0, 1]))
def test_pow_with_scalar_exponent(device, x, exponent):
    assert_op(lambda t: t ** exponent, lambda a: a ** exponent, [x], device)


@given(x=arrays(shapes()))
def test_pow_of_negative_base_with_integer_exponent(device, x):
    assert_op(lambda t: F.pow(t, 3), lambda a: a ** 3, [x], device)


# ------------------------------------------------------------------------- reductions
@st.composite
def reduction_case(draw, unique=False):
    shape = draw(shapes(max_dims=3))
    elements = st.integers(-40, 40).map(lambda i: i / 10) if unique else FINITE
    x = draw(arrays(shape, elements, unique=unique))  # unique: no ties for max
    axis = draw(st.one_of(
        st.none(), st.integers(-len(shape), len(shape) - 1),
        st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple)))
    return x, axis, draw(st.booleans())


@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
@given(data=st.data())
def test_reduction_over_axes_with_keepdims(device, name, data):
    x, axis, keepdims = data.draw(reduction_case(unique=name == "max"))
    fn = getattr(F, name)
    reference = getattr(np, name)
    assert_op(lambda t: fn(t, axis=axis, keepdims=keepdims),
              lambda a: reference(a, axis=axis, keepdims=keepdims), [x], device)


@given(x=arrays(hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=4)))
def test_unbiased_variance(device, x):
    assert_op(lambda t: F.var(t, axis=-1, ddof=1), lambda a: np.var(a, axis=-1, ddof=1), [x],
              device)


def test_max_splits_the_gradient_between_ties(device):
    x = Tensor(np.array([1.0, 3.0, 3.0, 2.0]), requires_grad=True, device=device)
    F.max(x).backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0, 0.5, 0.5, 0])


# ------------------------------------------------------------------------ shape ops
@given(data=st.data())
def test_reshape(device, data):
    x = data.draw(arrays(shapes()))
    new_shape = data.draw(st.permutations(list(x.shape)).map(tuple)) + (1,)
    assert_op(lambda t: t.reshape(new_shape), lambda a: a.reshape(new_shape), [x], device)


@given(data=st.data())
def test_transpose_and_permute(device, data):
    x = data.draw(arrays(shapes(max_dims=4, max_side=3)))
    axes = tuple(data.draw(st.permutations(range(x.ndim))))
    assert_op(lambda t: t.permute(*axes), lambda a: a.transpose(axes), [x], device)
    assert_op(lambda t: t.T, lambda a: a.T, [x], device)


@given(data=st.data())
def test_basic_indexing(device, data):
    x = data.draw(arrays(shapes(min_dims=2, max_dims=3, max_side=5)))
    start = data.draw(st.integers(0, x.shape[0] - 1))
    index = (slice(start, None), data.draw(st.integers(-x.shape[1], x.shape[1] - 1)))
    assert_op(lambda t: t[index], lambda a: a[index], [x], device)
    assert_op(lambda t: t[..., None, ::2], lambda a: a[..., None, ::2], [x], device)


@given(data=st.data())
def test_integer_array_indexing_adds_up_repeated_positions(device, data):
    x = data.draw(arrays(shapes(min_dims=1, max_dims=2, max_side=4)))
    picks = data.draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=8))
    index = np.array(picks)  # repeats allowed: the backward must scatter-add
    assert_op(lambda t: t[index], lambda a: a[index], [x], device)


@given(data=st.data())
def test_concatenate_stack_split(device, data):
    shape = data.draw(shapes(max_dims=3, max_side=3))
    axis = data.draw(st.integers(0, len(shape) - 1))
    a, b = data.draw(arrays(shape)), data.draw(arrays(shape))
    assert_op(lambda x, y: F.concatenate([x, y, x], axis=axis),
              lambda x, y: np.concatenate([x, y, x], axis=axis), [a, b], device)
    assert_op(lambda x, y: F.stack([x, y], axis=axis), lambda x, y: np.stack([x, y], axis=axis),
              [a, b], device)
    size = data.draw(st.integers(1, shape[axis]))
    pieces = np.split(a, range(size, shape[axis], size), axis=axis)
    for i, piece in enumerate(pieces):
        assert_op(lambda x, i=i: F.split(x, size, axis=axis)[i], lambda x, p=piece: p, [a], device)


@given(data=st.data())
def test_where_and_masked_fill(device, data):
    (shape_c, shape_a, shape_b), _ = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=3, min_dims=1, max_dims=3, max_side=3))
    condition = data.draw(hnp.arrays(bool, shape_c))
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b))
    xp = backend.array_module(device)
    cond = xp.asarray(condition)
    assert_op(lambda x, y: F.where(cond, x, y), lambda x, y: np.where(condition, x, y), [a, b],
              device)
    mask_shape = np.broadcast_shapes(shape_c, shape_a)
    assert_op(lambda x: F.masked_fill(x, cond, -7.0),
              lambda x: np.where(condition, -7.0, x) * np.ones(mask_shape), [a], device)


# ------------------------------------------------------------------- softmax and loss
def softmax_reference(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@given(data=st.data())
def test_softmax_and_log_softmax(device, data):
    x = data.draw(arrays(shapes(), st.floats(-5, 5, width=64)))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    assert_op(lambda t: F.softmax(t, axis), lambda a: softmax_reference(a, axis), [x], device)
    assert_op(lambda t: F.log_softmax(t, axis), lambda a: np.log(softmax_reference(a, axis)),
              [x], device)


def cross_entropy_reference(logits, targets, ignore_index=-100):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    losses = [-np.log(softmax_reference(row, 0)[t]) for row, t in zip(logits, targets, strict=True)
              if t != ignore_index]
    return np.mean(losses) if losses else np.nan


@given(data=st.data(), three_d=st.booleans())
def test_cross_entropy_with_ignored_targets(device, data, three_d):
    classes = data.draw(st.integers(2, 5))
    lead = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))) if three_d else \
        (data.draw(st.integers(1, 5)),)
    logits = data.draw(arrays(lead + (classes,), st.floats(-4, 4, width=64)))
    targets = data.draw(hnp.arrays(np.int64, lead, elements=st.integers(0, classes - 1)))
    ignored = data.draw(hnp.arrays(bool, lead))
    ignored.flat[0] = False  # at least one counted target
    targets = np.where(ignored, -100, targets)
    xp = backend.array_module(device)
    assert_op(lambda t: F.cross_entropy(t, xp.asarray(targets)),
              lambda a: cross_entropy_reference(a, targets), [logits], device)


def test_cross_entropy_is_stable_for_huge_logits(device):
    logits = Tensor(np.array([[1000.0, 0.0, -1000.0], [0.0, 5e4, 0.0]], dtype=np.float32),
                    requires_grad=True, device=device)
    loss = F.cross_entropy(logits, np.array([0, 0]))
    assert np.isclose(loss.item(), (0.0 + 5e4) / 2)
    loss.backward()
    assert np.all(np.isfinite(backend.to_numpy(logits.grad)))


@given(data=st.data())
def test_embedding_adds_gradients_of_repeated_ids(device, data):
    vocab, width = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    ids_shape = data.draw(shapes(max_dims=2, max_side=4))
    ids = data.draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, vocab - 1)))
    weight = data.draw(arrays((vocab, width)))
    xp = backend.array_module(device)
    assert_op(lambda w: F.embedding(xp.asarray(ids), w), lambda w: w[ids], [weight], device)


# ---------------------------------------------------------------------- normalization
@given(data=st.data(), with_bias=st.booleans())
def test_layer_norm(device, data, with_bias):
    x = data.draw(arrays(shapes(max_dims=3, max_side=5)))
    x = x + np.linspace(0, 1, x.shape[-1])  # a spread along the normalized axis (var > 0)
    c = x.shape[-1]
    w, b = data.draw(arrays((c,))), data.draw(arrays((c,)))

    def reference(x_, w_, b_=0.0):
        return (x_ - x_.mean(-1, keepdims=True)) / np.sqrt(x_.var(-1, keepdims=True) + 1e-5) \
            * w_ + b_

    if with_bias:
        assert_op(F.layer_norm, reference, [x, w, b], device)
    else:
        assert_op(F.layer_norm, reference, [x, w], device)


@given(data=st.data())
def test_rms_norm(device, data):
    x = data.draw(arrays(shapes(max_dims=3, max_side=5)))
    x = x + 0.5  # keep mean(x^2) away from 0
    w = data.draw(arrays((x.shape[-1],)))
    assert_op(F.rms_norm, lambda x_, w_: x_ / np.sqrt((x_ * x_).mean(-1, keepdims=True) + 1e-6)
              * w_, [x, w], device)


# ------------------------------------------------------------------------------ dropout
@given(x=arrays(shapes(max_side=6)), p=st.floats(0.1, 0.8), seed=st.integers(0, 2**16))
def test_dropout_is_a_seeded_scaled_mask(device, x, p, seed):
    def fn(t):
        backend.manual_seed(seed)  # the same mask on every call, so differences are smooth
        return F.dropout(t, p, training=True)

    out = forward(fn, [x], device)
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-12)
    check_gradients(fn, [x], device)
    assert F.dropout(Tensor(x, device=device), p, training=False).numpy() is not None
    np.testing.assert_array_equal(
        F.dropout(Tensor(x, device=device), p, training=False).numpy(), x)


def test_dropout_keeps_about_one_minus_p(device):
    backend.manual_seed(0)
    out = F.dropout(Tensor.ones(100_000, device=device), 0.3).numpy()
    assert abs((out != 0).mean() - 0.7) < 0.01


# ---------------------------------------------------------------------------- attention
def attention_reference(q, k, v, causal, mask=None):
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = np.ones((tq, tk), bool)
    if causal:
        allowed = np.array([[j <= i + tk - tq for j in range(tk)] for i in range(tq)])
    if mask is not None:
        allowed = allowed & mask
    scores = np.where(allowed, scores, -np.inf)
    return softmax_reference(scores, -1) @ v


def attention_inputs(data, max_keys):
    """q (B, H, Tq, D), k and v (B, H, Tk, D) with Tq <= Tk <= max_keys: fewer queries than keys
    is decoding with a KV cache."""
    batch, heads, dim = (data.draw(st.integers(1, 2)) for _ in range(3))
    tk = data.draw(st.integers(1, max_keys))
    tq = data.draw(st.integers(1, tk))
    q = data.draw(arrays((batch, heads, tq, dim)))
    k, v = data.draw(arrays((batch, heads, tk, dim))), data.draw(arrays((batch, heads, tk, dim)))
    return q, k, v


@given(data=st.data(), causal=st.booleans(), masked=st.booleans())
def test_scaled_dot_product_attention(device, data, causal, masked):
    q, k, v = attention_inputs(data, max_keys=4)
    tq, tk = q.shape[-2], k.shape[-2]
    mask = data.draw(hnp.arrays(bool, (tq, tk))) if masked else None
    if mask is not None:
        mask[:, 0] = True  # every query sees at least the first key
    xp = backend.array_module(device)
    device_mask = None if mask is None else xp.asarray(mask)
    assert_op(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, causal, device_mask),
              lambda q_, k_, v_: attention_reference(q_, k_, v_, causal, mask), [q, k, v], device)


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_attention_dropout_gradients(device, data, seed):
    q, k, v = (data.draw(arrays((1, 2, 3, 2))) for _ in range(3))

    def fn(q_, k_, v_):
        backend.manual_seed(seed)
        return F.scaled_dot_product_attention(q_, k_, v_, dropout_p=0.3)

    check_gradients(fn, [q, k, v], device)


@given(data=st.data(), rows=st.integers(1, 3), cached_mask=st.booleans())
def test_causal_attention_in_blocks_of_queries(device, data, rows, cached_mask):
    # blocks of 1-3 queries, each multiplied only by the keys it may see (the CPU path)
    from tinygrad_llm import fused

    q, k, v = attention_inputs(data, max_keys=7)
    tq, tk = q.shape[-2], k.shape[-2]
    xp = backend.array_module(device)

    def fn(q_, k_, v_):
        if not cached_mask:  # the op builds the causal mask itself
            return F.scaled_dot_product_attention(q_, k_, v_, causal=True)
        mask = F.make_additive_mask(F.causal_mask(tq, tk, xp), np.float64)  # as GPT passes it
        return F.scaled_dot_product_attention(q_, k_, v_, causal=False, additive_mask=mask,
                                              mask_is_causal=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "CAUSAL_BLOCK_ROWS", rows)
        assert_op(fn, lambda q_, k_, v_: attention_reference(q_, k_, v_, True), [q, k, v],
                  device)


def one_query_inputs(data, how):
    """q (B, H, 1, D), k, v (B, H, Tk, D) and the keys each sequence may see (B, Tk): all of
    them, or some padding blocked ("padding"); the query always sees its own (last) key."""
    batch, heads, dim = (data.draw(st.integers(1, 3)) for _ in range(3))
    tk = data.draw(st.integers(1, 9))
    q = data.draw(arrays((batch, heads, 1, dim)))
    k, v = data.draw(arrays((batch, heads, tk, dim))), data.draw(arrays((batch, heads, tk, dim)))
    if how == "padding":
        allowed = data.draw(hnp.arrays(bool, (batch, tk)))
    else:
        allowed = np.ones((batch, tk), bool)
    allowed[:, -1] = True
    return q, k, v, allowed


def one_query_attention(tensors, how, allowed, dtype):
    """The op as GPT calls it: ``causal``, or the additive mask it caches: (1, Tk) causal, or
    (B, 1, 1, Tk) with padding."""
    if how == "causal":
        return F.scaled_dot_product_attention(*tensors, causal=True)
    xp = backend.array_module(tensors[0].device)
    blocked = F.causal_mask(1, allowed.shape[1], xp) | ~xp.asarray(allowed)[:, None, None, :]
    mask = F.make_additive_mask(blocked if how == "padding" else blocked[0, 0], dtype)
    return F.scaled_dot_product_attention(*tensors, causal=False, additive_mask=mask,
                                          mask_is_causal=how == "cached causal")


@given(data=st.data(), how=st.sampled_from(["causal", "cached causal", "padding"]))
def test_one_query_without_gradients_equals_the_reference(device, data, how):
    # decoding: one query per sequence and head under no_grad takes its own short path on the
    # CPU (fused._one_query_attention); it must give what the formula gives
    from tinygrad_llm import fused

    q, k, v, allowed = one_query_inputs(data, how)
    calls = []
    real = fused._one_query_attention

    def counted(*args):
        calls.append(args)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch, no_grad():
        patch.setattr(fused, "_one_query_attention", counted)
        out = one_query_attention([Tensor(a, device=device) for a in (q, k, v)], how, allowed,
                                  np.float64)
    expected = np.stack([attention_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], False,
                                             allowed[b][None, :])[0] for b in range(len(q))])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert len(calls) == (device == "cpu")  # the short path on the CPU only


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_one_query_path_equals_the_general_path_in_its_dtype(device, dtype):
    # the same op with gradients wanted runs the general path: both in float32 and float16 (where
    # scores of 40 * 40 * 64 = 102,400 overflow unless q is scaled before the product)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, t, 64)).astype(dtype) for t in (1, 7, 7))
    q[0, 0], k[0, 0] = 40, 40
    allowed = np.ones((2, 7), bool)
    allowed[1, :3] = False  # left padding in the second sequence
    for how in ("cached causal", "padding"):
        with no_grad():
            short = one_query_attention([Tensor(a, device=device) for a in (q, k, v)], how,
                                        allowed, dtype).numpy()
        general = one_query_attention([Tensor(a, device=device, requires_grad=True)
                                       for a in (q, k, v)], how, allowed, dtype).numpy()
        assert short.dtype == general.dtype == dtype
        assert np.isfinite(short).all()
        np.testing.assert_allclose(short, general, rtol=1e-2 if dtype == np.float16 else 1e-5,
                                   atol=1e-2 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("tk", [5, 8])
def test_causal_blocks_cover_exactly_the_keys_each_query_sees(device, tk):
    from tinygrad_llm import fused

    tq, seen = 5, []
    for q0, q1, k1 in fused.causal_blocks(tq, tk, 2):
        assert q1 - q0 <= 2
        assert k1 == q1 + tk - tq  # no more keys than its last query sees
        seen += [(i, k1) for i in range(q0, q1)]
    # query i sees keys 0 .. i + tk - tq: its block's keys reach its own last key, and the
    # block's last query needs all of them
    assert [i for i, _ in seen] == list(range(tq))
    assert all(k1 >= i + tk - tq + 1 for i, k1 in seen)
    assert [k1 for _, k1 in seen][-1] == tk


def test_attention_dropout_in_blocks_equals_one_block(device):
    # the keep mask is drawn whole, so blocks of queries see the same dropped weights
    from tinygrad_llm import fused

    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((2, 2, 7, 3)) for _ in range(4))
    results = []
    for rows in (2, 100):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fused, "CAUSAL_BLOCK_ROWS", rows)
            backend.manual_seed(5)
            tensors = [Tensor(a, device=device, requires_grad=True) for a in (q, k, v)]
            out = F.scaled_dot_product_attention(*tensors, dropout_p=0.4)
            out.backward(Tensor(g, device=device))
            results.append([out.numpy()] + [t.grad for t in tensors])
    for blocked, whole in zip(*results, strict=True):
        np.testing.assert_allclose(backend.to_numpy(blocked), backend.to_numpy(whole),
                                   rtol=1e-12, atol=1e-12)


def test_attention_large_enough_for_batched_blas_equals_the_plain_products(device, monkeypatch):
    # (1, 2, 256, 64) as views of one qkv array, as the GPT passes them: on NumPy's OpenBLAS the
    # products of the blocks go through blas.matmul_into's batched call; the same op with one
    # block and np.matmul (checked against finite differences above) is the reference
    from tinygrad_llm import blas, fused

    calls, real = [], blas._batched_gemm

    def counting(dtype_char):  # counts the batched calls, and makes them
        batched = real(dtype_char)
        return batched and batched._replace(function=lambda *a: calls.append(batched.function(*a)))
    monkeypatch.setattr(blas, "_batched_gemm", counting)
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, 256, 3, 2, 64)).transpose(2, 0, 3, 1, 4)
    g = rng.standard_normal((1, 2, 256, 64))
    results = []
    for batched, rows in ((True, 128), (False, 1000)):
        monkeypatch.setenv("TINYGRAD_LLM_BATCHED_BLAS", "1" if batched else "0")
        monkeypatch.setattr(fused, "CAUSAL_BLOCK_ROWS", rows)
        source = Tensor(qkv, device=device, requires_grad=True)
        out = F.scaled_dot_product_attention(source[0], source[1], source[2], causal=True)
        out.backward(Tensor(g, device=device))
        results.append((out.numpy(), backend.to_numpy(source.grad)))
    if device == "cpu" and blas.can_batch():  # 2 products forward, 4 backward, per block
        assert len(calls) == 12
    np.testing.assert_allclose(results[0][0], attention_reference(*qkv, True), rtol=1e-10)
    for batched, plain in zip(*results, strict=True):
        np.testing.assert_allclose(batched, plain, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_finite_output(device):
    q = Tensor(np.ones((1, 1, 2, 2)), device=device)
    mask = backend.array_module(device).zeros((2, 2), dtype=bool)
    out = F.scaled_dot_product_attention(q, q, q, causal=False, mask=mask)
    assert np.all(np.isfinite(out.numpy()))


@given(data=st.data(), with_bias=st.booleans(), chunk_bytes=st.sampled_from([8, 40, 1 << 20]))
def test_fused_linear_cross_entropy_equals_linear_then_cross_entropy(device, data, with_bias,
                                                                     chunk_bytes):
    rows, width, classes = (data.draw(st.integers(1, 5)) for _ in range(3))
    x, w = data.draw(arrays((2, rows, width))), data.draw(arrays((width, classes + 1)))
    b = data.draw(arrays((classes + 1,)))
    targets = data.draw(hnp.arrays(np.int64, (2, rows), elements=st.integers(0, classes)))
    targets[1, 0] = -100  # an ignored position
    xp = backend.array_module(device)
    t = xp.asarray(targets)
    tensors = [x, w, b] if with_bias else [x, w]

    def fused(*args):  # small chunk_bytes: chunks of a row or two
        return F.linear_cross_entropy(args[0], args[1], t, *args[2:], chunk_bytes=chunk_bytes)

    def reference(*args):
        logits = args[0] @ args[1] + (args[2] if len(args) == 3 else 0)
        return cross_entropy_reference(logits, targets)

    assert_op(fused, reference, tensors, device)


# ------------------------------------------------------------ fused ops = their formulas
def _unfused_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal mask) v, from primitives."""
    blocked = F.causal_mask(q.shape[-2], k.shape[-2])
    scores = q @ k.swapaxes(-1, -2) * (1 / math.sqrt(q.shape[-1]))
    return F.softmax(F.masked_fill(scores, blocked, -1e9), axis=-1) @ v


FUSED_AND_UNFUSED = {  # name: (fused, the same formula written with the primitives, input shapes)
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, w, b),
        lambda x, w, b: (x - x.mean(-1, keepdims=True)) / F.sqrt(x.var(-1, keepdims=True) + 1e-5)
        * w + b,
        [(2, 3, 5), (5,), (5,)]),
    "rms_norm": (
        lambda x, w: F.rms_norm(x, w),
        lambda x, w: x / F.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w,
        [(2, 3, 5), (5,)]),
    "cross_entropy": (  # the counted positions of the targets below, and their targets
        lambda x: F.cross_entropy(x, np.array([[0, 3, -100], [2, 1, 3]])),
        lambda x: -F.log_softmax(x)[np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2]),
                                    np.array([0, 3, 2, 1, 3])].mean(),
        [(2, 3, 4)]),
    "linear_cross_entropy": (
        lambda x, w, b: F.linear_cross_entropy(x, w, np.array([[1, 0], [2, -100]]), b,
                                               chunk_bytes=16),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), np.array([[1, 0], [2, -100]])),
        [(2, 2, 3), (3, 4), (4,)]),
    "embedding": (
        lambda w: F.embedding(np.array([[0, 2, 2], [1, 0, 2]]), w),
        lambda w: w[np.array([[0, 2, 2], [1, 0, 2]])],
        [(3, 4)]),
    "scaled_dot_product_attention": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
        _unfused_attention,
        [(1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 2)]),
}


@pytest.mark.parametrize("name", sorted(FUSED_AND_UNFUSED))
def test_fused_op_equals_its_unfused_formula(device, name):
    """Each op of fused.py gives the values and gradients of the formula its docstring names."""
    fused, unfused, shapes_ = FUSED_AND_UNFUSED[name]
    rng = np.random.default_rng(0)
    arrays_ = [rng.standard_normal(shape) for shape in shapes_]
    results = []
    for fn in (fused, unfused):
        tensors = [Tensor(a, requires_grad=True, device=device) for a in arrays_]
        out = fn(*tensors)
        out.backward(backend.to_device(np.ones(out.shape), device))
        results.append((out.numpy(), [t.grad for t in tensors]))
    (fused_out, fused_grads), (unfused_out, unfused_grads) = results
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-10, atol=1e-12)
    for fused_grad, unfused_grad in zip(fused_grads, unfused_grads, strict=True):
        np.testing.assert_allclose(backend.to_numpy(fused_grad), backend.to_numpy(unfused_grad),
                                   rtol=1e-9, atol=1e-12)


# ------------------------------------------------- integer inputs are checked on the host
@pytest.mark.parametrize("bad_id", [5, 7, -1])
def test_embedding_rejects_host_ids_outside_the_table(device, bad_id):
    weight = Tensor(np.zeros((5, 2)), device=device)
    with pytest.raises(ValueError, match=f"embedding id {bad_id} is out of range for a table of "
                                         r"5 rows: ids must be in 0\.\.4"):
        F.embedding(np.array([[0, 4, bad_id]]), weight)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("bad_target", [3, -1])
def test_loss_rejects_host_targets_outside_the_classes(device, op, bad_target):
    x, w = Tensor(np.zeros((2, 4)), device=device), Tensor(np.zeros((4, 3)), device=device)
    loss = (lambda t: F.cross_entropy(x @ w, t)) if op == "cross_entropy" else \
        (lambda t: F.linear_cross_entropy(x, w, t))
    with pytest.raises(ValueError, match=f"target {bad_target} is out of range for 3 classes: "
                                         r"targets must be in 0\.\.2, or ignore_index=-100"):
        loss(np.array([0, bad_target]))
    assert np.isclose(loss(np.array([2, -100])).item(), np.log(3))  # ignore_index is allowed


def test_first_invalid_id_finds_the_first_bad_id_and_skips_the_allowed_one(device):
    ids = np.array([[0, 4, 9], [-3, 2, -100]])
    assert F.first_invalid_id(ids, 5) == 9
    assert F.first_invalid_id(ids, 10) == -3
    assert F.first_invalid_id(np.array([0, -100, 3]), 4, allowed=-100) is None
    assert F.first_invalid_id(np.array([], dtype=np.int64), 4) is None


# ------------------------------------------ NumPy operands of tensors on another device
def test_where_masked_fill_and_attention_take_numpy_masks(device):
    """Conditions and masks given as NumPy arrays are moved to the tensors' device (a TypeError
    in CuPy otherwise)."""
    x = Tensor(np.arange(4.0).reshape(1, 1, 2, 2), device=device)
    condition = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(F.where(condition, x, 0.0).numpy()[0, 0], [[0, 0], [0, 3]])
    np.testing.assert_array_equal(F.masked_fill(x, condition, -1.0).numpy()[0, 0],
                                  [[-1, 1], [2, -1]])
    allowed = np.array([[True, False], [True, True]])
    expected = F.scaled_dot_product_attention(x, x, x, causal=True).numpy()
    np.testing.assert_allclose(
        F.scaled_dot_product_attention(x, x, x, causal=False, mask=allowed).numpy(), expected)
    additive = F.make_additive_mask(~allowed, x.dtype)  # a NumPy array, whatever the device
    np.testing.assert_allclose(
        F.scaled_dot_product_attention(x, x, x, causal=False, additive_mask=additive).numpy(),
        expected)


def test_attention_takes_either_an_additive_mask_or_causal_and_mask(device):
    x = Tensor(np.ones((1, 1, 2, 2)), device=device)
    additive = F.make_additive_mask(F.causal_mask(2, 2), x.dtype)
    with pytest.raises(ValueError, match="additive_mask is the whole mask"):
        F.scaled_dot_product_attention(x, x, x, additive_mask=additive)  # causal=True by default
