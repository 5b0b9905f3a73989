"""Sampling and decoding: the sampler's distributions, KV cache = recomputation, batching,
stopping, streaming and cropping."""

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend, cpu_kernels
from tinygrad_llm.generate import (
    generate,
    generate_text,
    generate_tokens,
    next_token_distribution,
    sample_next,
    stream_text,
)
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tensor import no_grad
from tinygrad_llm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=13, context_length=12, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    backend.manual_seed(3)
    m = GPT(CONFIG).to(request.param)
    for p in m.parameters():  # larger weights: sharper, more varied predictions
        p.data *= 8
    return m


def frequencies(logits, n=20000, device="cpu", **kwargs):
    """Sampled on ``device``, with a generator of its array module (NumPy's or CuPy's)."""
    rng = backend.array_module(device).random.default_rng(0)
    batch = backend.to_device(np.repeat(logits[None], n, axis=0), device)
    draws = backend.to_numpy(sample_next(batch, rng, **kwargs))
    return np.bincount(draws, minlength=logits.size) / n


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_top_k_1_take_the_argmax(device):
    logits = np.random.default_rng(0).standard_normal((4, 9))
    rng = backend.array_module(device).random.default_rng(0)
    on_device = backend.to_device(logits, device)
    greedy = sample_next(on_device, rng, temperature=0)
    assert np.array_equal(backend.to_numpy(greedy), logits.argmax(-1))
    top_1 = sample_next(on_device, rng, temperature=1.0, top_k=1)
    assert np.array_equal(backend.to_numpy(top_1), logits.argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_follows_the_temperature_scaled_softmax(device):
    for temperature in (1.0, 0.5, 2.0):
        expected = np.exp(LOGITS / temperature)
        expected /= expected.sum()
        np.testing.assert_allclose(frequencies(LOGITS, device=device, temperature=temperature),
                                   expected, atol=0.015)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_and_top_p_keep_only_the_most_likely(device):
    np.testing.assert_allclose(frequencies(LOGITS, device=device, top_k=2),
                               [2 / 3, 1 / 3, 0, 0, 0], atol=0.015)
    # nucleus 0.8: 0.5 + 0.25 < 0.8, so the third token (0.15) is needed, the rest dropped
    np.testing.assert_allclose(frequencies(LOGITS, device=device, top_p=0.8),
                               [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], atol=0.015)
    # the top token alone already covers p
    assert frequencies(LOGITS, device=device, top_p=0.3)[0] == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", [{}, {"temperature": 0.5}, {"temperature": 2.0}, {"top_k": 2},
                                  {"top_p": 0.8}, {"top_k": 3, "top_p": 0.6},
                                  {"temperature": 0}], ids=str)
def test_the_distribution_shown_is_the_one_sampled(device, rule):
    shuffled = LOGITS[[3, 0, 4, 1, 2]]  # not sorted: top-p must put ids back in place
    shown = backend.to_numpy(next_token_distribution(backend.to_device(shuffled[None], device),
                                                     **rule))[0]
    assert shown.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(frequencies(shuffled, device=device, **rule), shown, atol=0.015)


def test_the_distribution_of_top_p_by_hand():
    # 0.5 + 0.25 < 0.8: the third token (0.15) is needed; renormalised over 0.9
    np.testing.assert_allclose(next_token_distribution(LOGITS[None], top_p=0.8)[0],
                               [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0])


def test_seed_makes_sampling_reproducible(model):
    prompts = [[1, 2, 3]]
    first = generate(model, prompts, 8, temperature=1.0, seed=5)
    assert generate(model, prompts, 8, temperature=1.0, seed=5) == first
    assert any(generate(model, prompts, 8, temperature=1.0, seed=s) != first for s in range(6, 9))


def test_kv_cache_gives_the_tokens_of_full_recomputation(model):
    prompts = [[1, 5, 2], [7], [3, 3, 3, 3, 3, 8]]
    # 10 new tokens: the longest sequence outgrows the 12-token window (cropping included)
    cached = generate(model, prompts, 10, temperature=0, use_cache=True)
    recomputed = generate(model, prompts, 10, temperature=0, use_cache=False)
    assert cached == recomputed
    assert len(set(map(tuple, cached))) > 1  # the prompts really lead to different outputs


def test_unwritten_cache_positions_are_never_read(model, monkeypatch):
    # KVCache's buffers are left unfilled (empty): with NaN where nothing was written yet, a read
    # of such a position would turn the logits into NaN. Left padding included (a batch).
    new_kv_cache = type(model).new_kv_cache

    def poisoned(self, batch):
        caches = new_kv_cache(self, batch)
        for cache in caches:
            cache.k[...] = np.nan
            cache.v[...] = np.nan
        return caches

    monkeypatch.setattr(type(model), "new_kv_cache", poisoned)
    prompts = [[1, 5, 2], [7], [3, 3, 3, 3]]
    with no_grad():
        caches = model.new_kv_cache(1)
        logits = [model(np.array([[4, 1, 7]]), caches).numpy()]
        logits += [model(np.array([[t]]), caches).numpy() for t in (2, 9)]
    assert np.isfinite(np.concatenate(logits, axis=1)).all()
    cached = generate(model, prompts, 6, temperature=0, use_cache=True)
    assert cached == generate(model, prompts, 6, temperature=0, use_cache=False)


def test_kv_cache_logits_match_a_full_forward(model):
    ids = np.array([[4, 1, 7, 7, 2, 9]])
    with no_grad():
        full = model(ids).numpy()
        caches = model.new_kv_cache(1)
        prefix = model(ids[:, :4], caches).numpy()
        steps = [model(ids[:, t:t + 1], caches).numpy() for t in (4, 5)]
    np.testing.assert_allclose(np.concatenate([prefix] + steps, axis=1), full, rtol=1e-4,
                               atol=1e-4)


def test_a_batch_gives_each_prompt_what_it_gets_alone(model):
    prompts = [[2, 4, 6, 8], [1], [5, 3]]
    together = generate(model, prompts, 6, temperature=0)
    alone = [generate(model, [p], 6, temperature=0)[0] for p in prompts]
    assert together == alone


def test_each_sequence_stops_at_end_of_text(model):
    prompts = [[1, 2], [3, 4], [5]]
    free = generate(model, prompts, 8, temperature=0)
    eos = free[0][2]  # a token the first sequence emits (at step 3 or earlier)
    stopped = generate(model, prompts, 8, temperature=0, eos_token=eos)
    for row, tokens in enumerate(free):
        cut = tokens.index(eos) if eos in tokens else len(tokens)
        assert stopped[row] == tokens[:cut]
    steps = list(generate_tokens(model, [[1, 2]], 8, temperature=0, eos_token=eos))
    first_eos = free[0].index(eos) + 1
    assert len(steps) == first_eos and steps[-1][1].all()  # no step after all are finished


def test_long_prompts_are_cropped_to_the_window(model):
    long_prompt = list(np.random.default_rng(0).integers(0, 13, 40))
    out = generate(model, [long_prompt], 3, temperature=0)
    assert out == generate(model, [long_prompt[-12:]], 3, temperature=0)


def test_stop_strings_and_streaming(model):
    tokenizer = CharTokenizer("abcdefghijklm")
    free = generate_text(model, tokenizer, "abc", 10, temperature=0)
    stop = free[3:5]
    assert generate_text(model, tokenizer, "abc", 10, temperature=0, stop=[stop]) == \
        free[:free.index(stop)]
    pieces = list(stream_text(model, tokenizer, "abc", 10, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == free
    streamed = "".join(stream_text(model, tokenizer, "abc", 10, temperature=0, stop=[stop]))
    assert streamed == free[:free.index(stop)]
    assert generate_text(model, tokenizer, ["abc", "m"], 4, temperature=0)[0] == free[:4]


@pytest.mark.parametrize("bias, qkv_bias", [(True, True), (False, False), (False, True)])
def test_decoding_on_arrays_gives_the_modules_logits_and_caches(bias, qkv_bias, monkeypatch):
    # GPT.hidden_states runs each block's decode_step for one new position on the CPU (with the
    # compiled kernels): against the modules' forward, step by step, for a left-padded batch
    pytest.importorskip("numba")
    from tinygrad_llm.generate import _positions
    from tinygrad_llm.models import gpt

    backend.manual_seed(5)
    config = GPTConfig(vocab_size=13, context_length=12, n_layer=2, n_head=2, n_embd=16,
                       bias=bias, qkv_bias=qkv_bias)
    model = GPT(config).eval()
    for p in model.parameters():
        p.data *= 4
    ids = np.array([[0, 0, 0, 4, 1, 7, 7, 2, 9], [3, 5, 8, 1, 2, 6, 6, 0, 11]])
    mask = np.array([[False] * 3 + [True] * 6, [True] * 9])
    steps = []  # each step's decode_step calls
    decode_step = gpt.Block.decode_step
    calls = []
    monkeypatch.setattr(gpt.Block, "decode_step", lambda *a: calls.append(1) or decode_step(*a))

    def run():
        with no_grad():
            caches = model.new_kv_cache(2)
            logits = [model(ids[:, :4], caches, _positions(mask[:, :4]), mask[:, :4]).numpy()]
            for t in range(4, 9):
                calls.clear()
                positions = _positions(mask[:, :t + 1])[:, -1:]
                logits.append(model(ids[:, t:t + 1], caches, positions, mask[:, :t + 1]).numpy())
                steps.append(len(calls))
        return np.concatenate(logits, axis=1), caches

    on_arrays, caches = run()
    assert steps == [config.n_layer] * 5  # every block of every one-position step
    steps.clear()
    monkeypatch.setattr(GPT, "decodes_on_arrays", lambda *a: False)
    modules, reference = run()
    assert steps == [0] * 5
    np.testing.assert_allclose(on_arrays, modules, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(caches, reference, strict=True):
        assert mine.length == theirs.length == 9
        for row, first in enumerate((3, 0)):  # the positions each sequence has written
            np.testing.assert_allclose(mine.k[row, :, first:9], theirs.k[row, :, first:9],
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mine.v[row, :, first:9], theirs.v[row, :, first:9],
                                       rtol=1e-5, atol=1e-5)


def test_decoding_on_arrays_only_where_it_computes_the_forward(monkeypatch):
    # the modules' forward runs when a graph is wanted, in training mode, under autocast, with
    # a LoRA-wrapped layer or a subclassed block, a cache of another kind or of another batch
    # size, a padded new position, or the kernels off (a GPU's arrays: cpu_kernels.enabled)
    pytest.importorskip("numba")
    from tinygrad_llm import functional as F
    from tinygrad_llm.lora import apply_lora
    from tinygrad_llm.tensor import Tensor

    model = GPT(GPTConfig(vocab_size=13, context_length=12, n_layer=2, n_head=2, n_embd=16,
                          dropout=0.1)).eval()
    x, caches = Tensor(np.zeros((1, 1, 16), np.float32)), model.new_kv_cache(1)
    with no_grad():
        assert model.decodes_on_arrays(x, caches, None)
        assert model.decodes_on_arrays(x, caches, np.array([[True]]))
        assert not model.decodes_on_arrays(x, caches, np.array([[False]]))  # the new one padded
        assert not model.decodes_on_arrays(x, [object()] * 2, None)
        with F.autocast(np.float16):
            assert not model.decodes_on_arrays(x, caches, None)
        monkeypatch.setattr(cpu_kernels, "SWITCHED_OFF", True)
        assert not model.decodes_on_arrays(x, caches, None)
        monkeypatch.setattr(cpu_kernels, "SWITCHED_OFF", False)
        assert not model.decodes_on_arrays(x, model.new_kv_cache(2), None)  # 2 rows, 1 sequence
        model.train()  # dropout 0.1 applies while training
        assert not model.decodes_on_arrays(x, caches, None)
        model.eval()

        class MyBlock(type(model.h[0])):
            pass

        block = model.h[1]
        block.__class__ = MyBlock  # a subclass may have a forward of its own
        assert not model.decodes_on_arrays(x, caches, None)
        block.__class__ = MyBlock.__base__
        assert model.decodes_on_arrays(x, caches, None)
    assert not model.decodes_on_arrays(x, caches, None)  # gradients wanted
    apply_lora(model, rank=2)
    with no_grad():
        assert not model.decodes_on_arrays(x, caches, None)
