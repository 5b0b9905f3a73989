"""Each compiled CPU kernel (cpu_kernels.py, numba) against the array code it replaces.

Skipped where numba is not installed (``pip install "tinygrad-llm[cpu]"``). The array code is
the reference: with ``TINYGRAD_LLM_CPU_KERNELS=0`` (``cpu_kernels.SWITCHED_OFF``) it runs.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import Tensor, cpu_kernels
from tinygrad_llm import functional as F
from tinygrad_llm.optim import AdamW

pytest.importorskip("numba")


def both_ways(compute):
    """compute() with the kernels off (the reference) and on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "SWITCHED_OFF", True)
        reference = compute()
        patch.setattr(cpu_kernels, "SWITCHED_OFF", False)
        compiled = compute()
    return reference, compiled


def test_the_switch_and_the_conditions():
    x = np.ones((2, 3), np.float32)
    assert cpu_kernels.enabled(np, x)
    assert not cpu_kernels.enabled(np, x.T)  # not C-contiguous
    assert not cpu_kernels.enabled(np, x.astype(np.float16))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "SWITCHED_OFF", True)
        assert not cpu_kernels.enabled(np, x)


@settings(deadline=None)  # the first call of each dtype compiles the kernel
@given(rows=st.integers(1, 9), width=st.integers(1, 70), lead=st.integers(1, 3),
       bias=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_kernels_match_the_array_code(rows, width, lead, bias, dtype, transposed,
                                                 seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((lead, rows, width)) * 3 + rng.standard_normal()).astype(dtype)
    if transposed:  # a non-contiguous input, as a permuted activation would be
        x = np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)
    w, b = (rng.standard_normal(width).astype(dtype) for _ in range(2))
    g = rng.standard_normal(x.shape).astype(dtype)

    def compute():
        tensors = [Tensor(a, requires_grad=True) for a in ((x, w, b) if bias else (x, w))]
        y = F.layer_norm(*tensors)
        y.backward(Tensor(g))
        return [y.numpy()] + [t.grad for t in tensors]

    tolerance = {np.float32: 2e-4, np.float64: 1e-10}[dtype]
    for reference, compiled in zip(*both_ways(compute), strict=True):
        assert compiled.dtype == reference.dtype
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(compiled, reference, rtol=tolerance, atol=tolerance * scale)


def test_layer_norm_kernel_sums_many_rows_in_float64():
    # dw and db add 100,000 rows. Summed in float64, the error stays near float32's rounding of
    # each term (1e-7 of the sum of their sizes); a float32 running sum drifts ~100x further.
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((100_000, 8)).astype(np.float32) + 1 for _ in range(2))
    w = np.ones(8, np.float32)
    xhat, y, rstd = np.empty_like(x), np.empty_like(x), np.empty((len(x), 1), np.float32)
    cpu_kernels.layer_norm_forward_rows(x, xhat, rstd, y, weight=w, bias=None, eps=1e-5)
    sums = {}
    cpu_kernels.layer_norm_backward_rows(g, xhat, rstd, np.empty_like(g), weight=w, sums=sums)
    (share,) = sums.values()  # one block: all the rows
    dw, db = (total.astype(np.float32) for total in share)  # as fused.LayerNorm returns them
    for got, terms in ((db, g.astype(np.float64)), (dw, g.astype(np.float64) * xhat)):
        size = np.abs(terms).sum(0)
        np.testing.assert_array_less(np.abs(got - terms.sum(0)), 1e-7 * size)
        drift = np.abs(np.cumsum(terms.astype(np.float32), 0, dtype=np.float32)[-1]
                       - terms.sum(0))
        assert drift.max() > 10 * np.abs(got - terms.sum(0)).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_kernel_matches_the_array_code(dtype):
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(shape).astype(dtype) for shape in ((5, 3), (7,), (2, 3, 4))]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in start] for _ in range(4)]

    def compute():
        params = [Tensor(p.copy(), requires_grad=True) for p in start]
        optimizer = AdamW(params, lr=0.01, weight_decay=0.1)
        for step in grads:  # four steps: the moments and bias corrections build up
            for p, g in zip(params, step, strict=True):
                p.grad = g.copy()
            optimizer.step()
        return [p.data for p in params] + optimizer.m + optimizer.v

    tolerance = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for reference, compiled in zip(*both_ways(compute), strict=True):
        np.testing.assert_allclose(compiled, reference, rtol=tolerance, atol=tolerance)


def test_adamw_kernel_keeps_overflow_visible():
    # an inf gradient (a float16 step that overflowed) must still reach the weights as non-finite,
    # as in the array code; the kernels may reorder sums but keep inf and NaN
    p = Tensor(np.ones(4, np.float32), requires_grad=True)
    p.grad = np.array([1, np.inf, 1, 1], np.float32)
    AdamW([p], lr=0.1).step()
    assert np.isfinite(p.data).tolist() == [True, False, True, True]


@settings(deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), tq=st.integers(1, 9),
       extra_keys=st.integers(0, 3), dim=st.integers(1, 5), rows=st.sampled_from([2, 3, 64]),
       dropout=st.sampled_from([0.0, 0.3]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_causal_softmax_kernels_match_the_array_code(batch, heads, tq, extra_keys, dim, rows,
                                                      dropout, dtype, seed):
    # with blocks of 2, 3 or 64 queries, and more keys than queries (a KV cache); the products
    # by NumPy around the softmax kernel, as without MKL (the attention kernels switched off;
    # they have their own test below)
    from tinygrad_llm import backend, fused

    rng = np.random.default_rng(seed)
    tk = tq + extra_keys
    q = rng.standard_normal((batch, heads, tq, dim)).astype(dtype) * 2
    k, v = (rng.standard_normal((batch, heads, tk, dim)).astype(dtype) * 2 for _ in range(2))
    g = rng.standard_normal(q.shape).astype(dtype)

    def compute():
        backend.manual_seed(seed)
        tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*tensors, causal=True, dropout_p=dropout)
        out.backward(Tensor(g))
        return [out.numpy()] + [t.grad for t in tensors]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "CAUSAL_BLOCK_ROWS", rows)
        patch.setattr(cpu_kernels, "attention_enabled", lambda *arrays: False)
        results = both_ways(compute)
    tolerance = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for reference, compiled in zip(*results, strict=True):
        np.testing.assert_allclose(compiled, reference, rtol=tolerance, atol=tolerance)


def _attention_kernels_run() -> bool:
    from tinygrad_llm import blas

    return blas.mkl() is not None and cpu_kernels.attention_enabled(np.zeros((1, 1, 1, 1)))


@settings(deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), tq=st.integers(1, 9),
       extra_keys=st.integers(0, 3), dim=st.integers(1, 9), rows=st.sampled_from([2, 3, 64]),
       packed=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_attention_kernels_match_the_array_code(batch, heads, tq, extra_keys, dim, rows, packed,
                                                dtype, seed):
    # each (sequence, head)'s products and softmax in one kernel, on the arrays as a GPT has
    # them: q, k, v (B, H, T, D) views of (B, T, H, D) memory, or of one packed (B, T, 3, H, D)
    # array (the input projection's output); blocks of 2, 3 or 64 queries; a KV cache's extra
    # keys. Against the array code, and the kernels must really have run where they apply.
    from tinygrad_llm import fused

    if not _attention_kernels_run():
        pytest.skip("needs MKL (the attention kernels call its products)")
    rng = np.random.default_rng(seed)
    tk = tq + extra_keys

    def heads_view(length, parts):  # (parts of) (B, T, parts, H, D) memory as (B, H, T, D)
        memory = rng.standard_normal((batch, length, parts, heads, dim)).astype(dtype) * 2
        return [memory[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]

    if packed and extra_keys == 0:
        q, k, v = heads_view(tq, 3)
    else:
        (q,), (k, v) = heads_view(tq, 1), heads_view(tk, 2)
    g = heads_view(tq, 1)[0]
    ran = []

    def compute():
        tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*tensors, causal=True)
        out.backward(Tensor(g))
        return [out.numpy()] + [t.grad for t in tensors]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "CAUSAL_BLOCK_ROWS", rows)
        for name in ("attention_forward", "attention_backward"):
            real = getattr(cpu_kernels, name)
            patch.setattr(cpu_kernels, name,
                          lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
        results = both_ways(compute)
    blocks = -(-tq // rows) if batch * heads >= cpu_kernels.team_threads() else 0  # (else the
    # array code: fewer pairs than threads)
    assert ran == ["attention_forward"] * blocks + ["attention_backward"] * blocks
    tolerance = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for reference, compiled in zip(*results, strict=True):
        np.testing.assert_allclose(compiled, reference, rtol=tolerance, atol=tolerance)


def test_attention_kernels_take_a_broadcast_gradient():
    # out.sum()'s gradient is one broadcast array (no rows BLAS can read): copied first
    if not _attention_kernels_run():
        pytest.skip("needs MKL (the attention kernels call its products)")
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((2, 3, 5, 4)).astype(np.float32) for _ in range(3)]

    def compute():
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        F.scaled_dot_product_attention(*tensors, causal=True).sum().backward()
        return [t.grad for t in tensors]

    for reference, compiled in zip(*both_ways(compute), strict=True):
        np.testing.assert_allclose(compiled, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["threaded", "values wider", "keys shared by the heads",
                                  "fewer pairs than threads"])
def test_attention_kernels_where_they_run_and_where_not(case, monkeypatch):
    # a problem large enough for the team (the kernels' parallel build against the array code),
    # and what the kernels do not take -- values of another width than the keys, keys and values
    # broadcast over the heads, fewer (sequence, head) pairs than threads -- left to the array
    # code, which must give its own result, not an error
    if not _attention_kernels_run():
        pytest.skip("needs MKL (the attention kernels call its products)")
    rng = np.random.default_rng(5)
    shape_q, shape_k, shape_v = (3, 4, 70, 16), (3, 4, 70, 16), (3, 4, 70, 16)
    if case == "values wider":
        shape_v = (3, 4, 70, 24)
    elif case == "keys shared by the heads":
        shape_k = shape_v = (3, 1, 70, 16)
    elif case == "fewer pairs than threads":
        monkeypatch.setattr(cpu_kernels, "team_threads", lambda: 64)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in (shape_q, shape_k,
                                                                         shape_v)]
    g = rng.standard_normal(shape_q[:3] + shape_v[3:]).astype(np.float32)
    ran = []
    real = cpu_kernels.attention_forward
    monkeypatch.setattr(cpu_kernels, "attention_forward",
                        lambda *a, **k: ran.append(1) or real(*a, **k))

    def compute():
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        out = F.scaled_dot_product_attention(*tensors, causal=True)
        if case == "keys shared by the heads":  # (the array code's backward does not take it)
            return [out.numpy()]
        out.backward(Tensor(g))
        return [out.numpy()] + [t.grad for t in tensors]

    for reference, compiled in zip(*both_ways(compute), strict=True):
        np.testing.assert_allclose(compiled, reference, rtol=2e-5, atol=2e-5)
    assert bool(ran) == (case == "threaded")


@settings(deadline=None, max_examples=40)
@given(queries=st.integers(1, 40), extra_keys=st.integers(0, 5), rows=st.sampled_from([1, 3, 32]),
       add=st.booleans(), seed=st.integers(0, 1000))
def test_attention_kernels_in_blocks_of_queries_equal_the_formulas(queries, extra_keys, rows,
                                                                   add, seed):
    # the kernels take a (sequence, head)'s queries in blocks of ATTENTION_BLOCK_ROWS, each
    # multiplied by only the keys its last query sees: against the formulas in NumPy (float64),
    # with keys before the queries (query r sees keys 0..r + extra_keys), blocks that do not
    # divide the queries, and dk, dv added to
    if not _attention_kernels_run():
        pytest.skip("needs MKL (the attention kernels call its products)")
    rng = np.random.default_rng(seed)
    keys, width = queries + extra_keys, 4
    q = rng.standard_normal((2, 2, queries, width)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, keys, width)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(q.shape).astype(np.float32)
    before_k, before_v = (rng.standard_normal(k.shape).astype(np.float32) for _ in range(2))
    probs, out = np.full((2, 2, queries, keys), np.nan, np.float32), np.empty_like(q)
    dq, dk, dv = np.full_like(q, np.nan), before_k.copy(), before_v.copy()
    original = cpu_kernels.ATTENTION_BLOCK_ROWS
    try:
        cpu_kernels.ATTENTION_BLOCK_ROWS = rows
        cpu_kernels.attention_forward(q, k, v, probs, out, extra_keys)
        cpu_kernels.attention_backward(q, k, v, probs, out, g, dq, dk, dv, 0.5, add=add,
                                       diagonal=extra_keys)
    finally:
        cpu_kernels.ATTENTION_BLOCK_ROWS = original
    q64, k64, v64, g64 = (a.astype(np.float64) for a in (q, k, v, g))
    scores = q64 @ k64.swapaxes(-1, -2)
    seen = np.arange(keys) <= np.arange(queries)[:, None] + extra_keys
    scores = np.where(seen, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v64
    ds = p * (g64 @ v64.swapaxes(-1, -2) - (g64 * o).sum(-1, keepdims=True))
    expected = [p, o, 0.5 * ds @ k64, ds.swapaxes(-1, -2) @ q64 + (before_k if add else 0),
                p.swapaxes(-1, -2) @ g64 + (before_v if add else 0)]
    for got, want in zip([probs, out, dq, dk, dv], expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_kernels_refuse_arrays_that_do_not_fit():
    # the kernels index without checks and BLAS reads by address: the wrappers check first
    if not _attention_kernels_run():
        pytest.skip("needs MKL (the attention kernels call its products)")
    q = np.zeros((2, 3, 5, 4), np.float32)
    kv = np.zeros((2, 3, 7, 4), np.float32)
    fine = dict(q=q, k=kv, v=kv, probs=np.zeros((2, 3, 5, 7), np.float32), out=q.copy())
    cpu_kernels.attention_forward(**fine, diagonal=2)
    read_only = np.zeros_like(q)
    read_only.flags.writeable = False
    one_matrix = np.lib.stride_tricks.as_strided(np.zeros((5, 4), np.float32), q.shape,
                                                 (0, 0, 16, 4))  # writable, every [b, h] one
    for bad in [dict(k=kv[:, :, :6]), dict(v=kv[:1]), dict(probs=np.zeros((2, 3, 5, 6))),
                dict(probs=np.zeros((2, 3, 7, 5), np.float32).swapaxes(-1, -2)),
                dict(out=q[:, :2]), dict(q=q.astype(np.float64)), dict(q=q[..., ::2]),
                dict(out=np.zeros((2, 3, 4, 5), np.float32).swapaxes(-1, -2)),
                dict(v=np.zeros((2, 3, 7, 6), np.float32)), dict(out=q), dict(out=read_only),
                dict(out=one_matrix), dict(k=kv[:, :1]), dict(q=q[:, :, :0])]:
        with pytest.raises(ValueError, match="do not fit"):
            cpu_kernels.attention_forward(**(fine | bad), diagonal=2)
    grads = dict(g=q, dq=q.copy(), dk=kv.copy(), dv=kv.copy())
    cpu_kernels.attention_backward(**fine, **grads, scale=0.5, add=False, diagonal=2)
    for bad in [dict(dk=q.copy()), dict(g=kv), dict(dq=q[:, :, :4]), dict(dv=grads["dk"]),
                dict(dq=fine["out"])]:
        with pytest.raises(ValueError, match="do not fit"):
            cpu_kernels.attention_backward(**fine, **(grads | bad), scale=0.5, add=True,
                                           diagonal=2)


def test_causal_softmax_kernel_zeroes_what_a_query_may_not_see():
    scores = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    expected = np.where(np.arange(5) <= np.arange(3)[:, None] + 1, np.exp(scores), 0)
    expected /= expected.sum(-1, keepdims=True)
    cpu_kernels.causal_softmax(scores, 1)  # query r sees keys 0..r + 1
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


@settings(deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), dim=st.integers(1, 9),
       position=st.integers(0, 12), room=st.integers(0, 3), padding=st.integers(0, 12),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_decode_attention_kernel_matches_the_array_code(batch, heads, dim, position, room,
                                                        padding, dtype, seed):
    # one new query per sequence over a KV cache's buffers (room: unused positions beyond), the
    # first sequence left-padded: against the general attention op on the cache's keys
    from tinygrad_llm import fused

    rng = np.random.default_rng(seed)
    length = position + 1 + room
    keys, values = (rng.standard_normal((batch, heads, length, dim)).astype(dtype) * 2
                    for _ in range(2))
    qkv = rng.standard_normal((batch, 3 * heads * dim)).astype(dtype) * 2
    allowed = np.ones((batch, position + 1), bool)
    allowed[0, :min(padding, position)] = False  # the new position itself stays visible
    q, k, v = (part.reshape(batch, heads, 1, dim) for part in np.split(qkv, 3, axis=1))
    cached_k = np.concatenate([keys[:, :, :position], k], axis=2)  # (B, H, position + 1, D)
    cached_v = np.concatenate([values[:, :, :position], v], axis=2)
    blocked = F.make_additive_mask(~allowed[:, None, None, :], dtype)  # (B, 1, 1, Tk)
    expected = fused.ScaledDotProductAttention.apply(
        *(Tensor(a) for a in (q, cached_k, cached_v)), mask=blocked, dropout_p=0.0,
        device="cpu").numpy()  # (B, H, 1, D)
    untouched = keys[:, :, position + 1:].copy()
    out = np.full((batch, heads * dim), np.nan, dtype)
    cpu_kernels.decode_attention(keys, values, qkv, position, allowed, out)
    # scores reach ~20 here: one float32 rounding of a score (summed in another order, scaled
    # after the product instead of before) moves its weight by up to ~4e-6 of it
    tolerance = {np.float32: 2e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out, expected.reshape(batch, heads * dim), rtol=tolerance,
                               atol=tolerance)
    np.testing.assert_array_equal(keys[:, :, :position + 1], cached_k)  # the new key stored
    np.testing.assert_array_equal(values[:, :, :position + 1], cached_v)
    np.testing.assert_array_equal(keys[:, :, position + 1:], untouched)  # nothing beyond


@pytest.mark.parametrize("shape", [(3, 5), (300, 257)])  # the second on the team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fill_rows_writes_the_row_into_every_row(shape, dtype):
    row = np.random.default_rng(0).standard_normal(shape[1]).astype(dtype)
    out = np.full(shape, np.nan, dtype)
    cpu_kernels.fill_rows(out, row)
    np.testing.assert_array_equal(out, np.broadcast_to(row, shape))


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 300, 257)])  # the last on the team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_kernel_equals_numpys_sum(shape, dtype):
    # one addition per element: exactly NumPy's a + b, also written over one of its inputs;
    # backend.add takes it for large arrays of one shape, and NumPy's + for anything else
    from tinygrad_llm import backend

    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    cpu_kernels.add(a, b, out)
    np.testing.assert_array_equal(out, a + b)
    expected, into_a = a + b, a.copy()
    cpu_kernels.add(into_a, b, into_a)
    np.testing.assert_array_equal(into_a, expected)
    np.testing.assert_array_equal(backend.add(a, b), a + b)
    np.testing.assert_array_equal(backend.add(a, b[..., :1]), a + b[..., :1])  # broadcast
    np.testing.assert_array_equal(backend.add(a, b.astype(np.float16)), a + b.astype(np.float16))
    # the kernel indexes without checks: its wrapper refuses what does not fit
    for bad in [(a, b[..., :1], out), (a, b, out.astype(np.float16)), (a, b, out[..., :-1]),
                (a, b, np.empty(shape[::-1], dtype).T)]:
        if bad[2].shape == a.shape and bad[2].flags.c_contiguous and bad[2].dtype == dtype:
            continue  # (a 1-d array's transpose is itself)
        with pytest.raises(ValueError, match="add"):
            cpu_kernels.add(*bad)


def test_gemm_call_refuses_what_does_not_fit():
    # MKL reads and writes by address: cpu_kernels.gemm checks shapes and dtypes first
    from tinygrad_llm import blas

    if blas.mkl() is None:
        pytest.skip("needs MKL")
    a, b, out = np.ones((4, 3), np.float32), np.ones((3, 5), np.float32), np.zeros((4, 5))
    no = cpu_kernels.NO_TRANSPOSE
    cpu_kernels.gemm(no, no, a, 3, b, 5, 0.0, out.astype(np.float32), 5)
    for a_, b_, out_ in [(a, b, out), (a, b[:2], out.astype(np.float32)),
                         (a, b, np.zeros((4, 6), np.float32))]:
        with pytest.raises(ValueError, match="gemm"):
            cpu_kernels.gemm(no, no, a_, 3, b_, 5, 0.0, out_, 5)


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 300, 257)])  # the last on the team
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_kernels_match_the_array_code(shape, dtype):
    rng = np.random.default_rng(0)
    x, g = ((rng.standard_normal(shape) * 3).astype(dtype) for _ in range(2))

    def compute(x=x, g=g):
        t = Tensor(x, requires_grad=True)
        y = F.gelu(t)
        y.backward(Tensor(g))
        return y.numpy(), t.grad

    reference, compiled = both_ways(compute)
    if dtype == np.float64:  # the C library's tanh against NumPy's: a few units in the last place
        for a, b in zip(reference, compiled, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13)
        return
    # float32: the kernel computes tanh its own way (cpu_kernels, "exp and tanh") and rounds
    # differently from the array code, so measure both against float64 and ask the kernel to be
    # no less exact
    exact = compute(x.astype(np.float64), g.astype(np.float64))
    for a, b, truth in zip(reference, compiled, exact, strict=True):
        assert np.abs(b - truth).max() <= 1.5 * np.abs(a - truth).max() + 1e-7


def test_a_numba_that_does_not_import_falls_back_with_a_warning(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("numba built for another NumPy")  # as a mismatched install does
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    cpu_kernels.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="does not import.*NumPy code"):
            assert not cpu_kernels.available()
        assert not cpu_kernels.enabled(np, np.ones(3, np.float32))
    finally:
        monkeypatch.undo()
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()


def test_float32_exp_and_tanh_against_float64():
    # the kernels' own exp and tanh (cpu_kernels, "exp and tanh, float32"), compiled in a loop
    # as the kernels use them, against NumPy's float64 functions rounded to float32
    import numba

    cpu_kernels._load_numba()
    exp, tanh = cpu_kernels._exp, cpu_kernels._tanh

    @numba.njit(fastmath=cpu_kernels._FASTMATH, error_model="numpy")  # the kernels' options
    def both(x, e, t):
        for i in range(x.shape[0]):
            e[i] = exp(x[i])
            t[i] = tanh(x[i])

    x = np.concatenate([np.linspace(-100, 100, 400_001, dtype=np.float32),
                        np.float32([0, -0.0, 1e-30, -1e-30, 88.72, 88.73, -87.0, -87.01, -np.inf,
                                    np.inf, np.nan])])
    e, t = np.empty_like(x), np.empty_like(x)
    both(x, e, t)
    exact_e, exact_t = np.exp(x.astype(np.float64)), np.tanh(x.astype(np.float64))
    normal = (x >= -87) & (x <= 88.72)  # results that are normal float32 numbers (and up
    # to the largest: exp(88.72) is 3.39e38, float32's largest 3.40e38)
    with np.errstate(over="ignore"):
        ulp = np.spacing(exact_e[normal].astype(np.float32)).astype(np.float64)
    assert (np.abs(e[normal] - exact_e[normal]) / ulp).max() <= 1.5  # units in the last place
    assert np.all(e[x < -87] == 0) and np.all(e[x > 88.73] == np.inf)  # 0 below, inf above
    finite = np.isfinite(x)
    assert np.abs(t[finite] - exact_t[finite]).max() <= 1.2e-7  # 1 unit in the last place of 1
    assert np.all(np.abs(t[finite]) <= 1)
    assert t[x == np.inf] == 1 and t[x == -np.inf] == -1
    assert np.isnan(e[-1]) and np.isnan(t[-1])  # NaN stays NaN (an overflowed float16 step)


def _each_kernel(rng, dtype):
    """(name, run) for every kernel, on arrays above PARALLEL_MIN_ELEMENTS; run() -> outputs."""
    rows, width = 700, 96  # 67,200 elements; 11 chunks of layer norm's partial sums
    x, g = (rng.standard_normal((rows, width)).astype(dtype) * 2 for _ in range(2))
    w, b = (rng.standard_normal(width).astype(dtype) for _ in range(2))
    scores = rng.standard_normal((6, 100, 120)).astype(dtype) * 3
    moments = [rng.random((rows, width)).astype(dtype) for _ in range(2)]
    a, c = 0.044715, 0.7978845608

    def layer_norm():
        xhat, y, rstd = np.empty_like(x), np.empty_like(x), np.empty((rows, 1), dtype)
        cpu_kernels.layer_norm_forward_rows(x, xhat, rstd, y, weight=w, bias=b, eps=1e-5)
        dx, sums = np.empty_like(x), {}
        cpu_kernels.layer_norm_backward_rows(g, xhat, rstd, dx, weight=w, sums=sums)
        return [xhat, y, rstd, dx, *sums[g.ctypes.data]]

    def softmax():
        probs = scores.copy()
        cpu_kernels.causal_softmax(probs, 20)
        dprobs = g[:600].reshape(6, 100, -1)[..., :96].copy()  # any (6, 100, Tk') block
        cpu_kernels.softmax_backward(dprobs, probs[..., :96].copy(), x[:600, :1].copy())
        return [probs, dprobs]

    def gelu():
        t, y, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        cpu_kernels.gelu_forward_rows(x, t, y, c=c, a=a)
        cpu_kernels.gelu_backward_rows(x, t, g, dx, c=c, a=a)
        return [t, y, dx]

    def adamw():
        p, m, v = x.copy(), moments[0].copy(), moments[1].copy()
        cpu_kernels.adamw_update(p, g, m, v, 0.9, 0.95, 1e-3, 1e-8, 0.999)
        return [p, m, v]

    cache = rng.standard_normal((2, 2, 4, 130, 32)).astype(dtype)  # 33,280 elements each
    qkv = rng.standard_normal((2, 3 * 128)).astype(dtype)

    def decode_attention():
        keys, values = cache.copy()
        out = np.empty((2, 128), dtype)
        allowed = np.arange(101) >= np.array([[0], [5]])  # the second sequence: 5 of padding
        cpu_kernels.decode_attention(keys, values, qkv, 100, allowed, out)
        return [keys, values, out]

    def fill_rows():
        out = np.empty_like(x)
        cpu_kernels.fill_rows(out, w)
        return [out]

    def add():
        out = np.empty_like(x)
        cpu_kernels.add(x, g, out)
        return [out]

    q, k, v, g4 = (rng.standard_normal((2, 4, 130, 32)).astype(dtype) for _ in range(4))

    def attention():  # as the model lays them out: q (B, H, T, D) seen from (B, T, H, D)
        view = np.empty((2, 130, 4, 32), dtype).transpose(0, 2, 1, 3)
        view[...] = q
        probs, out = np.empty((2, 4, 130, 130), dtype), np.empty_like(view)
        cpu_kernels.attention_forward(view, k, v, probs, out, 0)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        cpu_kernels.attention_backward(view, k, v, probs, out, g4, dq, dk, dv, 0.2, add=False,
                                       diagonal=0)
        return [probs, out, dq, dk, dv]

    kernels = [("layer_norm", layer_norm), ("softmax", softmax), ("gelu", gelu),
               ("adamw", adamw), ("decode_attention", decode_attention), ("fill_rows", fill_rows),
               ("add", add)]
    if _attention_kernels_run():
        kernels.append(("attention", attention))
    return kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_on_several_threads_equal_one_thread(dtype, monkeypatch):
    # every element (and each chunk of layer norm's sums) is computed by the same formula
    # whichever thread takes it; the parallel builds may only vectorise a loop differently
    # (with sums reordered: a rounding or two)
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: numba has no second thread")
    cpu_kernels._shares_mkl_team()  # numba's threads started as the library starts them
    asked = []  # the thread counts the parallel builds were run with
    monkeypatch.setattr(numba, "set_num_threads", asked.append)
    for name, run in _each_kernel(np.random.default_rng(1), dtype):
        monkeypatch.setattr(cpu_kernels, "team_threads", lambda: 1)
        serial = run()
        monkeypatch.setattr(cpu_kernels, "team_threads", lambda: 2)
        cpu_kernels._NUMBA_THREADS.count = None  # so that the parallel path says it ran
        threaded = run()
        assert asked and asked[-1] == 2, name
        asked.clear()
        tolerance = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
        for one, several in zip(serial, threaded, strict=True):
            np.testing.assert_allclose(several, one, rtol=tolerance, atol=tolerance,
                                       err_msg=name)


def test_a_split_op_runs_its_kernels_on_one_thread():
    # inside the share of a split op (the library's own threads, --threads) MKL and the kernels
    # get one thread each: the team is not asked for more threads than the cores
    from tinygrad_llm import blas

    if not cpu_kernels._shares_mkl_team():
        assert cpu_kernels.team_threads() == 1
        return
    assert cpu_kernels.team_threads() == blas.mkl().MKL_Get_Max_Threads() >= 1
    with blas.one_thread_here():
        assert cpu_kernels.team_threads() == 1


def test_omp_num_threads_is_kept_when_the_kernels_join_mkls_team():
    # starting its OpenMP layer, numba sets the thread count to its own (every core); the user's
    # OMP_NUM_THREADS=1 must hold for MKL's products and the kernels after that as before. In a
    # fresh process: the count is read when MKL and numba's layer start.
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: numba's own count would be one too")
    code = ("from tinygrad_llm import blas, cpu_kernels\n"
            "if blas.mkl() is None: print('no MKL')\n"
            "else: print(cpu_kernels._shares_mkl_team(), cpu_kernels.team_threads(),"
            " blas.mkl().MKL_Get_Max_Threads())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for overriding in ("MKL_NUM_THREADS", "MKL_DOMAIN_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(overriding, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    shown = done.stdout.splitlines()[-1].split()
    if shown[:2] == ["no", "MKL"] or shown[0] == "False":
        pytest.skip("the kernels do not run on MKL's team here")
    assert shown == ["True", "1", "1"]


def test_decode_attention_refuses_arrays_that_do_not_fit():
    # the kernel reads and writes by index without checks: the wrapper checks the shapes first
    keys = np.zeros((2, 3, 8, 4), np.float32)
    qkv, out = np.zeros((2, 36), np.float32), np.zeros((2, 12), np.float32)
    for bad in [dict(position=8), dict(allowed=np.ones((1, 6), bool)),
                dict(qkv=np.zeros((1, 36), np.float32)), dict(out=np.zeros((2, 11), np.float32))]:
        arguments = dict(keys=keys, values=keys.copy(), qkv=qkv, position=5,
                         allowed=np.ones((2, 6), bool), out=out) | bad
        if "position" in bad:
            arguments["allowed"] = np.ones((2, bad["position"] + 1), bool)
        with pytest.raises(ValueError, match="do not fit"):
            cpu_kernels.decode_attention(**arguments)
