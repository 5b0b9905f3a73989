"""GPT: the decoder-only transformer of GPT-2, in one reading.

    ids (B, T) -> token embedding + position embedding -> dropout
              -> n_layer x Block:  x = x + Attention(LayerNorm(x))
                                   x = x + MLP(LayerNorm(x))
              -> LayerNorm -> LM head (tied to the token embedding) -> logits (B, T, vocab)

Parameter names follow GPT-2's checkpoints (``wte``, ``h.0.attn.c_attn`` ...), and linear weights
are (in, out) like theirs, so loading OpenAI's weights is a renaming-free copy.

Decoding with a KV cache on the CPU (one new position per step) runs each block's
``decode_step``: the blocks' formulas on the arrays, in fewer calls (see the comment above
``_layer_norm_rows``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from operator import attrgetter

import numpy as np

from .. import backend, blas, cpu_kernels
from .. import functional as F
from ..nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from ..tensor import Tensor, is_grad_enabled


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024  # the longest sequence the position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and layer norms (GPT-2: yes)
    qkv_bias: bool = True  # bias on the query/key/value projection (GPT-2: yes)
    tie_weights: bool = True  # the LM head reuses the token embedding matrix (GPT-2: yes)
    layer_norm_eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPT config keys: {', '.join(unknown)}")
        return cls(**values)


# GPT-2's sizes (Radford et al. 2019, and OpenAI's released checkpoints) and small CPU presets.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # nanoGPT's CPU "baby" Shakespeare model: trains in minutes on a laptop
    "baby": dict(n_layer=4, n_head=4, n_embd=128, context_length=64, tie_weights=False),
    # a slightly larger one: still CPU-friendly
    "mini": dict(n_layer=6, n_head=6, n_embd=384, context_length=256, tie_weights=False),
}
# The small presets untie the LM head. With a tied head, every row of the embedding table gets a
# "do not predict me" gradient at every step, so the rows of all tokens that a small corpus never
# contains collapse into one direction (mean pairwise cosine 0.996 after pretraining on
# Shakespeare with GPT-2 tokens): a frozen body can then no longer tell them apart, which hurts
# finetuning on text with other words (docs/classification.md). Untied, their input embeddings
# keep their distinct random initialisation. GPT-2's own sizes stay tied, as GPT-2 is.


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class KVCache:
    """One layer's keys and values of the positions seen so far, for incremental decoding.

    Buffers of the full context length are allocated once; each step writes its new keys and
    values after the old ones, so a new token costs one position instead of the whole sequence.
    The buffers are left unfilled (``empty``; zeroing GPT-2's 24 buffers of 3 MB cost up to two
    tokens' time): only the positions written so far are ever read.
    """

    def __init__(self, batch: int, n_head: int, context_length: int, head_dim: int, xp, dtype):
        self.k = xp.empty((batch, n_head, context_length, head_dim), dtype=dtype)
        self.v = xp.empty_like(self.k)
        self.length = 0  # positions filled

    def append(self, k, v) -> tuple:
        """Store k, v (B, H, T, D) after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} positions > context length {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, T_past + T, D)


class CausalMaskCache:
    """The additive causal masks (Tq, Tk) of one model, built once per shape and kept.

    The mask is the same at every training step, and building it (a triangle, then a float copy)
    costs about as much as adding it, so the model keeps each one it has used, keyed by
    (device, query_length, key_length, dtype). At most ``max_entries`` are kept: decoding with a
    KV cache asks for a new key length at every step.
    """

    def __init__(self, max_entries: int = 32):
        self.masks: dict = {}
        self.max_entries = max_entries

    def get(self, query_length: int, key_length: int, device: str, dtype):
        """0 where query i may see key j, the float minimum where it may not: (Tq, Tk)."""
        key = (device, query_length, key_length, np.dtype(dtype).str)
        if key not in self.masks:
            if len(self.masks) >= self.max_entries:
                self.masks.clear()
            blocked = F.causal_mask(query_length, key_length, backend.array_module(device))
            self.masks[key] = F.make_additive_mask(blocked, dtype)
        return self.masks[key]


# Decoding with a KV cache runs the model on one new position per step. The arithmetic of a GPT-2
# token is then its matrix-vector products, which stream 0.5 GB of weights through the caches, and
# the modules' forward around them makes ~200 small ops per token, each a few NumPy calls that find
# their code and data evicted by those weights: ~9 of the ~31 ms of a token here. On the CPU, with
# the compiled kernels, ``GPT.hidden_states`` runs each block's ``decode_step`` instead: the same
# formulas on the arrays, about ten calls per block (docs/performance.md, "Decoding on arrays"),
# with these two helpers for the layers. Tests compare it with the modules' forward.
def _layer_norm_rows(norm: LayerNorm, x):
    """``norm(x)`` for rows x (B, C), on arrays."""
    y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty((len(x), 1), x.dtype)
    cpu_kernels.layer_norm_forward_rows(x, xhat, rstd, y, weight=norm.weight.data,
                                        bias=None if norm.bias is None else norm.bias.data,
                                        eps=norm.eps)
    return y


def _linear_rows(layer: Linear, x, add_to=None):
    """``layer(x)`` for rows x (B, in), on arrays: (B, out); with ``add_to`` (B, out), added to
    it in place (the product straight into it) and returned."""
    bias = None if layer.bias is None else layer.bias.data
    if add_to is None:
        return backend.matmul(x, layer.weight.data, bias=bias)
    blas.gemm(x, layer.weight.data, add_to, add=True)  # add_to += x W
    if bias is not None:
        add_to += bias  # (forward adds the bias before the residual sum: equal up to rounding)
    return add_to


class CausalSelfAttention(Module):
    """Multi-head attention in which each position sees itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, attn_mask=None,
                mask_is_causal: bool = False) -> Tensor:
        """x (B, T, C) -> (B, T, C). ``attn_mask``: the causal (and padding) mask in additive
        form, broadcastable to (B, H, T, T_keys), as GPT builds it once per forward
        (``mask_is_causal``: it is the causal mask alone, no padding); without one the op
        builds the causal mask itself."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.c_attn(x)  # (B, T, C) -> (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # -> (3, B, H, T, D)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, T, D)
        if cache is not None:  # decoding: attend to the cached positions too (no gradient)
            k_all, v_all = cache.append(k.data, v.data)
            k, v = Tensor(k_all), Tensor(v_all)
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p)
        else:  # the mask already holds the causal part: causal=False, so it is not applied twice
            y = F.scaled_dot_product_attention(q, k, v, causal=False, additive_mask=attn_mask,
                                               dropout_p=p, mask_is_causal=mask_is_causal)
        y = y.permute(0, 2, 1, 3).reshape(B, T, C)  # (B, H, T, D) -> heads side by side (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend_one(self, h, cache: KVCache, allowed):
        """``forward`` before its output projection, for one new position per sequence, on
        arrays (see ``Block.decode_step``): h (B, C) -> the heads side by side (B, C). The new
        keys and values go into ``cache``; ``allowed`` (B, Tk) bool: the keys each sees."""
        qkv = _linear_rows(self.c_attn, h)  # (B, 3C): q, k, v side by side, as in forward
        y = np.empty_like(h)
        # k, v of this position into cache.k, cache.v (B, H, L, D) at t = cache.length; then per
        # head: y_h = softmax(q_h K_h[:t+1]^T / sqrt(D), the padded keys left out) V_h[:t+1]
        cpu_kernels.decode_attention(cache.k, cache.v, qkv, cache.length, allowed, y)
        cache.length += 1
        return y


class MLP(Module):
    """Position-wise feed-forward network: expand 4x, GELU, project back."""

    def __init__(self, config: GPTConfig):
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> C


class Block(Module):
    """One transformer block, pre-LayerNorm: each sub-layer adds its output to the residual."""

    def __init__(self, config: GPTConfig):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, attn_mask=None,
                mask_is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, attn_mask, mask_is_causal)
        return x + self.mlp(self.ln_2(x))

    def decode_step(self, x, cache: KVCache, allowed) -> None:
        """``forward`` for one new position per sequence, on arrays, without dropout or a graph:
        x (B, C), the residual stream, updated in place. ``allowed`` (B, Tk) bool: the keys each
        sequence sees (its padding left out). GPT uses it when decoding on the CPU
        (``GPT.decodes_on_arrays``)."""
        attn, mlp = self.attn, self.mlp
        y = attn.attend_one(_layer_norm_rows(self.ln_1, x), cache, allowed)  # (B, C)
        _linear_rows(attn.c_proj, y, add_to=x)  # x = x + attn(ln_1(x))
        h = _linear_rows(mlp.c_fc, _layer_norm_rows(self.ln_2, x))  # (B, 4C)
        t, gelu = np.empty_like(h), np.empty_like(h)  # tanh(...) (the kernel writes it), GELU
        cpu_kernels.gelu_forward_rows(h, t, gelu, c=F.GELU_C, a=F.GELU_A)
        _linear_rows(mlp.c_proj, gelu, add_to=x)  # x = x + mlp(ln_2(x))


class GPT(Module):
    """GPT-2 style language model: ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = Embedding(config.context_length, config.n_embd)  # position embedding
        self.drop = Dropout(config.dropout)
        self.h = ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias)
        self.lm_head = None if config.tie_weights else Linear(config.n_embd, config.vocab_size,
                                                              bias=False)
        self.causal_masks = CausalMaskCache()  # what every block's attention adds to its scores
        # GPT-2 initialisation: N(0, 0.02) everywhere (done by the layers), but the projections
        # that write into the residual stream are scaled by 1/sqrt(2 n_layer), since 2 of them per
        # block add up along the residual path.
        std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.data *= np.float32(std / 0.02)

    def new_kv_cache(self, batch: int) -> list[KVCache]:
        """Empty KV caches, one per block, for ``batch`` sequences (see generate.py)."""
        c = self.config
        xp = backend.array_module(self.device)
        return [KVCache(batch, c.n_head, c.context_length, c.n_embd // c.n_head, xp,
                        self.wte.weight.dtype) for _ in range(c.n_layer)]

    def forward(self, ids, caches: list[KVCache] | None = None, positions=None, padding_mask=None,
                last_only: bool = False) -> Tensor:
        """Logits for every position (or only the last): (B, T, V).

        Args:
            ids: integer array or Tensor (B, T), each in 0..vocab_size-1. Ids on the host are
                checked; ids already on the GPU are not (it would cost a device sync per call),
                so keeping those in range is the caller's job.
            caches: from ``new_kv_cache``: earlier positions are read from them, and these
                positions are added to them (incremental decoding).
            positions: (B, T) position ids; default 0..T-1, after any cached positions.
            padding_mask: (B, T_keys) bool, False at padding (left-padded batches), covering the
                cached positions and these.
            last_only: compute logits for the last position only (B, 1, V): what sampling needs.
        """
        x = self.hidden_states(ids, caches, positions, padding_mask)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.wte.weight.T)  # (B, T, C) @ (C, V) -> (B, T, V)

    def loss(self, ids, targets, ignore_index: int = -100) -> Tensor:
        """Mean cross-entropy of next-token ``targets`` (B, T): the value of
        ``F.cross_entropy(self(ids), targets)``, with the LM head and the loss fused
        (``F.linear_cross_entropy``) so the (B, T, V) logits are never held at once."""
        x = self.hidden_states(ids)  # (B, T, C)
        if self.lm_head is None:
            return F.linear_cross_entropy(x, self.wte.weight.T, targets, None, ignore_index)
        head = self.lm_head
        if not isinstance(head, Linear):  # a wrapped head (e.g. LoRA's): its own forward, unfused
            return F.cross_entropy(head(x), targets, ignore_index)
        return F.linear_cross_entropy(x, head.weight, targets, head.bias, ignore_index)

    def hidden_states(self, ids, caches: list[KVCache] | None = None, positions=None,
                      padding_mask=None) -> Tensor:
        """The final hidden states (B, T, C), before the LM head: what a classification head
        reads (finetune/classification.py). Arguments as in ``forward``."""
        config, device = self.config, self.device
        xp = backend.array_module(device)
        ids = _host_array(ids)
        vocab = config.vocab_size
        bad = F.first_invalid_id(ids, vocab)  # checked on the host, before any GPU sees it
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab} tokens "
                             f"(ids must be in 0..{vocab - 1}); encode the text with the tokenizer "
                             "the model was built for")
        ids = backend.to_device(ids, device)
        B, T = ids.shape
        start = caches[0].length if caches else 0
        if start + T > config.context_length:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's context "
                             f"length {config.context_length}; crop it to the last "
                             f"{config.context_length} tokens")
        if positions is None:
            positions = xp.arange(start, start + T)  # (T,), the same for every row
        else:
            positions = _host_array(positions)
            bad = F.first_invalid_id(positions, config.context_length)
            if bad is not None:
                raise ValueError(f"position {bad} is outside the model's {config.context_length} "
                                 f"positions (0..{config.context_length - 1}); crop the sequence "
                                 "or count positions from 0")
            positions = backend.to_device(positions, device)
        x = self.wte(ids) + self.wpe(positions)  # (B, T, C) + (T, C) or (B, T, C) -> (B, T, C)
        x = self.drop(x)
        allowed = None if padding_mask is None else (  # (B, Tk): False at padding
            backend.to_device(_host_array(padding_mask), device).astype(bool))
        if caches and T == 1 and self.decodes_on_arrays(x, caches, allowed):
            return self.ln_f(self._decode_blocks(x, caches, allowed))
        dtype = self.wte.weight.dtype
        if allowed is None:  # causal only: the same mask at every step, cached
            attn_mask = self.causal_masks.get(T, start + T, device, dtype)  # (T, Tk)
        else:  # no query attends to padding: (B, Tk) -> (B, 1, 1, Tk), with the causal mask
            blocked = F.causal_mask(T, start + T, xp) | ~allowed[:, None, None, :]
            attn_mask = F.make_additive_mask(blocked, dtype)  # (B, 1, T, Tk), once per forward
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i], attn_mask, padding_mask is None)
        return self.ln_f(x)

    def decodes_on_arrays(self, x: Tensor, caches, allowed) -> bool:
        """Whether ``hidden_states`` may run the blocks' ``decode_step`` for this one position
        x (B, 1, C): where it computes what the modules' forward computes. On the CPU with the
        compiled kernels, in eval mode (no dropout), no graph wanted, no autocast; the blocks
        made of exactly the layers above (a LoRA-wrapped layer or a subclass has a forward of
        its own); a ``KVCache`` per block with a row per sequence; the new position visible to
        every sequence (``allowed`` (B, Tk) or None)."""
        if (self.training or is_grad_enabled() or F.autocast_dtype() is not None
                or not cpu_kernels.enabled(backend.get_array_module(x.data), x.data)):
            return False
        batch = x.shape[0]
        if not all(type(cache) is KVCache and cache.k.shape[0] == batch for cache in caches):
            return False
        if allowed is not None and (allowed.shape != (batch, caches[0].length + 1)
                                    or not allowed[:, -1].all()):
            return False
        plain = {"ln_1": LayerNorm, "ln_2": LayerNorm, "attn": CausalSelfAttention, "mlp": MLP,
                 "attn.c_attn": Linear, "attn.c_proj": Linear, "mlp.c_fc": Linear,
                 "mlp.c_proj": Linear}
        return all(type(block) is Block and all(
            type(attrgetter(name)(block)) is kind for name, kind in plain.items())
            for block in self.h)

    def _decode_blocks(self, x: Tensor, caches, allowed) -> Tensor:
        """The blocks' ``decode_step`` on x (B, 1, C), one new position per sequence: the
        hidden states (B, 1, C) before ``ln_f``, as the blocks' forward gives them."""
        B = x.shape[0]
        residual = x.data.reshape(B, -1).copy()  # (B, C): each block adds to it in place
        if allowed is None:  # no padding: every key
            allowed = np.ones((B, caches[0].length + 1), bool)
        for block, cache in zip(self.h, caches, strict=True):
            block.decode_step(residual, cache, allowed)
        return Tensor(residual.reshape(B, 1, -1))


def _host_array(array):
    """An integer array, list or Tensor as an array: NumPy, unless it already lives on the GPU
    (host ids are checked before they move: CuPy would wrap an out-of-range id around)."""
    array = array.data if isinstance(array, Tensor) else array
    return array if backend.get_array_module(array) is not np else np.asarray(array)
