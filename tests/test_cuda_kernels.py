"""Each fused CUDA kernel against the array code it replaces (the reference), on a real GPU.

Skipped without CuPy and a GPU, and under the CPU stand-in for CuPy (it cannot compile CUDA) --
except the flash kernels' source, which also runs on the CPU as C++ (tests/cuda_on_cpu.py).
"""

import sys

import cuda_on_cpu
import numpy as np
import pytest

from tinygrad_llm import Tensor, backend
from tinygrad_llm import functional as F
from tinygrad_llm.optim import AdamW

REAL_CUPY = backend.cuda_available() and hasattr(sys.modules.get("cupy"), "RawKernel")
on_gpu = pytest.mark.skipif(not REAL_CUPY, reason="needs CuPy, a GPU and its compiler")


def both_ways(monkeypatch, compute):
    """compute() with the kernels off (the reference) and on; NumPy results of each."""
    monkeypatch.setenv("TINYGRAD_LLM_CUDA_KERNELS", "0")
    reference = compute()
    monkeypatch.setenv("TINYGRAD_LLM_CUDA_KERNELS", "1")
    fused = compute()
    return reference, fused


def close(reference, fused, rtol=1e-5, atol=1e-6):
    for a, b in zip(reference, fused, strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


@on_gpu
@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 5, 768)])
def test_gelu_kernel_matches_the_array_code(monkeypatch, shape):
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(2))

    def compute():
        t = Tensor(x, requires_grad=True, device="cuda")
        y = F.gelu(t)
        y.backward(g)
        return y.numpy(), t.grad.get()

    close(*both_ways(monkeypatch, compute))


@on_gpu
def test_gelu_kernel_in_float16_is_float32_math_rounded_once(monkeypatch):
    """The float16 kernel computes in float32 and rounds once, so it lands within float16's
    rounding of the exact values. (The float16 array code rounds after every step: where 1 + tanh
    cancels, its gradients were off by up to 100% -- so it is no reference here.)"""
    monkeypatch.setenv("TINYGRAD_LLM_CUDA_KERNELS", "1")
    rng = np.random.default_rng(0)
    x, g = ((rng.standard_normal((2, 5, 768)) * 3).astype(np.float16) for _ in range(2))
    t = Tensor(x, requires_grad=True, device="cuda")
    y = F.gelu(t)
    y.backward(g)
    assert y.data.dtype == t.grad.dtype == np.float16
    X, G = x.astype(np.float64), g.astype(np.float64)
    c, a = np.sqrt(2 / np.pi), 0.044715
    tanh = np.tanh(c * (X + a * X**3))
    exact_y = 0.5 * X * (1 + tanh)
    exact_dx = G * 0.5 * (1 + tanh + X * (1 - tanh**2) * c * (1 + 3 * a * X**2))
    for got, exact in ((y.numpy(), exact_y), (t.grad.get(), exact_dx)):
        # half an ulp of float16 is 2^-11 relative; where 1 + tanh cancels near x = -4, float32
        # itself leaves up to ~1e-5 absolute (the float32 kernel and array code alike)
        np.testing.assert_allclose(got.astype(np.float64), exact, rtol=2**-10, atol=3e-5)


@on_gpu
@pytest.mark.parametrize("width", [1, 31, 128, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_kernels_match_the_array_code(monkeypatch, width, bias):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 3, width)) * 2 + 1).astype(np.float32)
    w, b = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((4, 3, width)).astype(np.float32)

    def compute():
        tensors = [Tensor(a, requires_grad=True, device="cuda") for a in (x, w, b)]
        y = F.layer_norm(tensors[0], tensors[1], tensors[2] if bias else None)
        y.backward(g)
        return [y.numpy()] + [t.grad.get() for t in tensors[:2 + bias]]

    close(*both_ways(monkeypatch, compute), rtol=1e-4, atol=1e-5)


@on_gpu
@pytest.mark.parametrize("vocab", [65, 50257])
def test_cross_entropy_kernel_matches_the_array_code(monkeypatch, vocab):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    w = (rng.standard_normal((32, vocab)) * 0.3).astype(np.float32)
    targets = rng.integers(0, vocab, (2, 9))
    targets[0, 3] = targets[1, 8] = -100  # ignored positions

    def compute():
        tx, tw = (Tensor(a, requires_grad=True, device="cuda") for a in (x, w))
        loss = F.linear_cross_entropy(tx, tw, targets, chunk_bytes=4 * vocab * 5)  # 5-row chunks
        loss.backward()
        return loss.numpy(), tx.grad.get(), tw.grad.get()

    close(*both_ways(monkeypatch, compute), rtol=1e-4, atol=1e-6)


@on_gpu
def test_adamw_kernel_matches_the_array_code(monkeypatch):
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (7,))]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in p0] for _ in range(3)]

    def compute():
        params = [Tensor(a, requires_grad=True, device="cuda") for a in p0]
        optimizer = AdamW(params, lr=1e-2, weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = backend.to_device(g, "cuda")
            optimizer.step()
        return [p.numpy() for p in params] + [m.get() for m in optimizer.m + optimizer.v]

    close(*both_ways(monkeypatch, compute), rtol=1e-5, atol=1e-7)


@on_gpu
@pytest.mark.parametrize("B, H, Tq, Tk, D", [(2, 3, 70, 70, 64), (1, 2, 16, 16, 32),
                                            (2, 1, 33, 100, 64), (1, 2, 130, 130, 128),
                                            (1, 1, 64, 64, 8)])
@pytest.mark.parametrize("flash", ["1", "0"])  # the flash kernels; cuBLAS + fused softmax
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_kernels_match_the_array_code(monkeypatch, B, H, Tq, Tk, D, flash, dropout):
    """Causal attention, forward and all three gradients; Tk > Tq is a prompt after a KV cache
    (bottom-right aligned), T not a multiple of the tiles checks the edges. With dropout the
    flash kernels step aside and the fused softmax runs."""
    monkeypatch.setenv("TINYGRAD_LLM_FLASH_ATTENTION", flash)
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, Tk, D)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    fused = []

    def compute():
        tensors = [Tensor(a, requires_grad=True, device="cuda") for a in (q, k, v)]
        backend.manual_seed(0)  # the same dropout both ways
        y = F.scaled_dot_product_attention(*tensors, causal=True, dropout_p=dropout)
        fused.append((y._ctx.flash, getattr(y._ctx, "fused_softmax", False)))
        y.backward(g)
        return [y.numpy()] + [t.grad.get() for t in tensors]

    close(*both_ways(monkeypatch, compute), rtol=1e-4, atol=2e-5)
    use_flash = flash == "1" and dropout == 0
    assert fused == [(False, False), (use_flash, not use_flash)]  # array code, then a kernel


@on_gpu
def test_a_gpt_with_the_kernels_gives_the_array_codes_loss_and_gradients(monkeypatch):
    from tinygrad_llm.models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=50, context_length=40, n_layer=2, n_head=4, n_embd=64)
    backend.manual_seed(0)
    weights = GPT(config).state_dict()
    rng = np.random.default_rng(5)
    ids, targets = rng.integers(0, 50, (3, 40)), rng.integers(0, 50, (3, 40))

    def compute():
        model = GPT(config).to("cuda")
        model.load_state_dict(weights)
        loss = model.loss(ids, targets)
        loss.backward()
        return [loss.numpy()] + [p.grad.get() for p in model.parameters()]

    for flash in ("1", "0"):
        monkeypatch.setenv("TINYGRAD_LLM_FLASH_ATTENTION", flash)
        close(*both_ways(monkeypatch, compute), rtol=2e-4, atol=2e-5)


def test_flash_kernels_take_only_the_shapes_they_index_correctly():
    """The kernels index q, k and v alike, (B * H, T, D) each: a broadcast k or v, another head
    size for v, or fewer keys than queries must go to the array code (shapes only: runs on any
    machine)."""
    from tinygrad_llm.cuda_kernels import flash_fits

    q = np.empty((2, 4, 64, 32), np.float32)
    assert flash_fits(q, q, q)
    assert flash_fits(q, np.empty((2, 4, 80, 32)), np.empty((2, 4, 80, 32)))  # Tk > Tq
    for k, v in [(np.empty((1, 4, 64, 32)), q),  # k broadcast over the batch
                 (q, np.empty((2, 1, 64, 32))),  # v broadcast over the heads
                 (q, np.empty((2, 4, 64, 16))),  # v of another head size
                 (np.empty((2, 4, 32, 32)), np.empty((2, 4, 32, 32)))]:  # fewer keys than queries
        assert not flash_fits(q, k, v)
    q30, short = q[..., :30], q[:, :, :8]
    assert not flash_fits(q30, q30, q30)  # a head size that is not a multiple of 4
    assert not flash_fits(short, short, short)  # a few query rows


@pytest.mark.skipif(cuda_on_cpu.compiler() is None, reason="needs a C++20 compiler")
@pytest.mark.parametrize("heads, Tq, Tk, D", [(3, 70, 70, 64), (2, 33, 100, 64), (1, 64, 64, 8)])
def test_the_flash_kernels_source_run_on_the_cpu_matches_the_array_code(tmp_path, heads, Tq, Tk,
                                                                        D):
    """The flash kernels compiled as C++ with a thread per CUDA thread (tests/cuda_on_cpu.py):
    runs without a GPU, so CI checks the kernels' indexing and barriers on every change."""
    rng = np.random.default_rng(6)
    q, g = (rng.standard_normal((heads, Tq, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((heads, Tk, D)).astype(np.float32) for _ in range(2))
    program = cuda_on_cpu.build_flash(D, tmp_path)
    got = cuda_on_cpu.run_flash(program, q, k, v, g, 1 / np.sqrt(D))
    tensors = [Tensor(a[None], requires_grad=True) for a in (q, k, v)]  # (1, heads, T, D)
    y = F.scaled_dot_product_attention(*tensors, causal=True)
    y.backward(g[None])
    scores = (q @ k.swapaxes(-1, -2)).astype(np.float64) / np.sqrt(D)
    scores[np.broadcast_to(F.causal_mask(Tq, Tk), scores.shape)] = -np.inf
    lse = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    for name, want in (("out", y.data[0]), ("lse", lse), ("dq", tensors[0].grad[0]),
                       ("dk", tensors[1].grad[0]), ("dv", tensors[2].grad[0])):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
