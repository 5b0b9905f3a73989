"""Each fused CUDA kernel against the array code it replaces (the reference), on a real GPU.

Skipped without CuPy and a GPU, and under the CPU stand-in for CuPy (it cannot compile CUDA).
"""

import sys

import numpy as np
import pytest

from tinygrad_llm import Tensor, backend
from tinygrad_llm import functional as F
from tinygrad_llm.optim import AdamW

REAL_CUPY = backend.cuda_available() and hasattr(sys.modules.get("cupy"), "RawKernel")
pytestmark = pytest.mark.skipif(not REAL_CUPY, reason="needs CuPy, a GPU and its compiler")


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


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 5, 768)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gelu_kernel_matches_the_array_code(monkeypatch, shape, dtype):
    rng = np.random.default_rng(0)
    x, g = ((rng.standard_normal(shape) * 3).astype(dtype) for _ in range(2))

    def compute():
        t = Tensor(x, requires_grad=True, device="cuda")
        y = F.gelu(t)
        y.backward(g)
        assert y.data.dtype == t.grad.dtype == dtype
        return y.numpy(), t.grad.get()

    # float16: the kernel computes in float32 and rounds once; the array code rounds each step
    close(*both_ways(monkeypatch, compute), **({} if dtype == np.float32 else
                                               dict(rtol=1e-2, atol=1e-2)))


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
