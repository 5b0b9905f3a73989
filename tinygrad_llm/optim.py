"""Optimizers, gradient clipping and the learning-rate schedule.

Updates run on raw arrays in place (no graph is recorded): each parameter's array is modified
where it lives, so an optimizer step allocates almost nothing.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, cpu_kernels, cuda_kernels


class Optimizer:
    """Holds the parameters that require gradients; ``lr`` may be changed between steps."""

    def __init__(self, params, lr: float):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimizer got no trainable parameters (all frozen?)")
        self.lr = lr
        self.step_count = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """Arrays of the optimizer's state, named by parameter index (for safetensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SGD(Optimizer):
    """p -= lr * (g + weight_decay * p), with optional momentum: v = momentum v + g."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity = [None] * len(self.params)

    def step(self) -> None:
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            update = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
            if self.momentum:
                if self.velocity[i] is None:
                    self.velocity[i] = update.copy()
                else:
                    self.velocity[i] *= self.momentum
                    self.velocity[i] += update
                update = self.velocity[i]
            p.data -= self.lr * update


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

        m = b1 m + (1 - b1) g            first moment (mean of gradients)
        v = b2 v + (1 - b2) g^2          second moment (uncentered variance)
        p -= lr * wd * p                 decay, only for matrices (ndim >= 2): not biases or norms
        p -= lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.beta1, self.beta2
        # fold both bias corrections into one step size and one eps (same math, fewer passes):
        # m_hat / (sqrt(v_hat) + eps) = (m / c1) / (sqrt(v) / sqrt(c2) + eps)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        step_size = self.lr * math.sqrt(c2) / c1
        eps = self.eps * math.sqrt(c2)
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            xp = backend.get_array_module(g)
            if self.m[i] is None:
                self.m[i], self.v[i] = xp.zeros_like(p.data), xp.zeros_like(p.data)
            m, v = self.m[i], self.v[i]
            decay = 1 - self.lr * self.weight_decay if self.weight_decay and p.ndim >= 2 else 1.0
            if cuda_kernels.enabled(xp, p.data, g):  # the lines below as one GPU kernel
                cuda_kernels.adamw_update(p.data, g, m, v, b1, b2, step_size, eps, decay)
                continue
            if (cpu_kernels.enabled(xp, p.data, g, m, v)
                    and p.data.dtype == g.dtype == m.dtype == v.dtype):  # as one compiled loop
                cpu_kernels.adamw_update(p.data, g, m, v, b1, b2, step_size, eps, decay)
                continue
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            if decay != 1.0:
                p.data *= decay
            denominator = xp.sqrt(v)
            denominator += eps
            update = xp.divide(m, denominator, out=denominator)
            update *= step_size
            p.data -= update

    def state_dict(self) -> dict:
        state = {}
        for i, (m, v) in enumerate(zip(self.m, self.v, strict=True)):
            if m is not None:
                state[f"{i}.m"], state[f"{i}.v"] = backend.to_numpy(m), backend.to_numpy(v)
        return state

    def load_state_dict(self, state: dict) -> None:
        for i, p in enumerate(self.params):
            if f"{i}.m" not in state:
                continue
            m, v = state[f"{i}.m"], state[f"{i}.v"]
            if tuple(m.shape) != p.shape:
                raise ValueError(f"optimizer state {i} has shape {tuple(m.shape)}, parameter has "
                                 f"{p.shape}: the checkpoint is from another model")
            self.m[i] = backend.to_device(m, p.device).astype(p.dtype)
            self.v[i] = backend.to_device(v, p.device).astype(p.dtype)


def grad_norm(params):
    """The global L2 norm of all gradients, sqrt(sum over every gradient g of sum(g^2)), as a
    0-d array on their device (nothing waits for a GPU here)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        device = params[0].device if params else "cpu"
        return backend.array_module(device).zeros((), np.float32)
    xp = backend.get_array_module(grads[0])
    # sum of squares through a BLAS dot product: no squared temporary per parameter
    return xp.sqrt(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads))


def clip_grad_norm(params, max_norm: float, norm=None):
    """Scale all gradients by one factor so that their global L2 norm is at most ``max_norm``.

        g <- g * min(1, max_norm / norm)

    Returns the norm before clipping (worth logging: spikes signal instability): a 0-d array
    on the gradients' device, or ``norm`` itself when the caller passes it (the trainer reads
    it on the host together with the loss, in one wait for the GPU).

    On a GPU, without ``norm``, nothing here waits for the device: the factor is computed there
    and every gradient is multiplied by it (by 1 when the norm is small) -- reading the norm on
    the host to decide would stall the step.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return np.zeros((), np.float32)
    total = grad_norm(params) if norm is None else norm
    xp = backend.get_array_module(grads[0])
    if xp is np or norm is not None:  # the norm is on the host: test it, skip the work if small
        if total > max_norm:
            scale = max_norm / (float(total) + 1e-6)
            for g in grads:
                g *= scale
        return total
    scale = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(grads[0].dtype)  # (), on device
    for g in grads:
        g *= scale
    return total


class LossScaler:
    """Dynamic loss scaling, for float16 gradients (Micikevicius et al. 2018, "Mixed Precision
    Training"; PyTorch's GradScaler has the same defaults).

    float16 holds magnitudes from 6e-8 (subnormal) to 65,504. Gradients of a language model are
    often smaller than the first, so they would round to zero. Multiplying the loss by ``scale``
    multiplies every gradient by it (the chain rule is linear), lifting them into range; dividing
    the float32 gradients by it afterwards (``unscale``) gives the true ones. Too large a scale
    overflows to inf instead: then the step is skipped and the scale halved. After
    ``growth_interval`` steps in a row without overflow it doubles, to stay as high as it can.
    """

    def __init__(self, scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale, self.growth_factor = float(scale), growth_factor
        self.backoff_factor, self.growth_interval = backoff_factor, growth_interval
        self.good_steps = 0  # steps since the last overflow or growth

    def unscale(self, params) -> None:
        """Divide every gradient by the scale, in place (on the device)."""
        inverse = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad *= inverse

    def update(self, overflow: bool) -> None:
        """After a step: halve the scale on overflow, double it after a run of good steps."""
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def cosine_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int,
                    total_steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to max_lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
