"""Check a backward pass against central finite differences (use float64 inputs).

For f: inputs -> output and a random upstream gradient u, the analytic gradient of
L = sum(u * f(x)) with respect to each input element must match

    dL/dx_j  ~=  (L(x + h e_j) - L(x - h e_j)) / (2 h)

whose error is O(h^2). A random (not all-ones) u makes a wrong transpose or a missing term show.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradientMismatch(AssertionError):
    """The analytic and numerical gradients disagree."""


def numerical_gradient(fn, arrays: list, index: int, upstream: np.ndarray, device: str,
                       step: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of sum(upstream * fn(*arrays)) with respect to arrays[index]."""
    arrays = [np.array(a, copy=True) for a in arrays]
    target = arrays[index]
    grad = np.zeros_like(target)

    def objective() -> float:
        with no_grad():
            out = fn(*[Tensor(a, device=device) for a in arrays])
        return float(np.sum(upstream * out.numpy()))

    for j in np.ndindex(target.shape):
        original = target[j]
        target[j] = original + step
        plus = objective()
        target[j] = original - step
        minus = objective()
        target[j] = original
        grad[j] = (plus - minus) / (2 * step)
    return grad


def check_gradients(fn, arrays: list, device: str = "cpu", wrt=None, seed: int = 0,
                    rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Raise ``GradientMismatch`` unless fn's backward matches finite differences.

    Args:
        fn: takes Tensors (one per array) and returns a Tensor.
        arrays: float64 NumPy arrays, the inputs.
        wrt: indices of the inputs to differentiate (default: all).
    Also checks that forward and backward leave the inputs unchanged.
    """
    wrt = range(len(arrays)) if wrt is None else wrt
    tensors = [Tensor(np.array(a, copy=True), requires_grad=i in wrt, device=device)
               for i, a in enumerate(arrays)]
    out = fn(*tensors)
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(backend.to_device(upstream, device))
    for i in wrt:
        if not np.array_equal(tensors[i].numpy(), arrays[i]):
            raise GradientMismatch(f"input {i} was modified by the op")
        analytic = tensors[i].grad
        analytic = np.zeros_like(arrays[i]) if analytic is None else backend.to_numpy(analytic)
        numeric = numerical_gradient(fn, arrays, i, upstream, device)
        if analytic.shape != numeric.shape or not np.allclose(analytic, numeric, rtol, atol):
            worst = np.max(np.abs(analytic - numeric)) if analytic.shape == numeric.shape else None
            raise GradientMismatch(
                f"gradient of input {i} disagrees with finite differences "
                f"(max abs error {worst}):\nanalytic\n{analytic}\nnumeric\n{numeric}"
            )
