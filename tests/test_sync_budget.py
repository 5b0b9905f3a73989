"""How often the host waits for the GPU: a training step and a decoding step have a budget.

A host read of a GPU array (``float()``, ``.item()``, ``asnumpy``, a boolean mask ...) makes the
CPU wait until every queued kernel has run, so the next kernels cannot be queued meanwhile. The
budgets below are counted with the CuPy stand-in's sync counter (``TINYGRAD_LLM_FAKE_CUDA=1``);
without the stand-in (plain CPU, or a real GPU, which has no counter) these tests skip.
"""

import sys

import numpy as np
import pytest

from tinygrad_llm import backend
from tinygrad_llm.generate import generate_tokens
from tinygrad_llm.lora import apply_lora
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import CharTokenizer
from tinygrad_llm.trainer import LanguageModelingTask, PretrainConfig, Trainer

FAKE = getattr(sys.modules.get("cupy"), "IS_FAKE", False)
pytestmark = pytest.mark.skipif(not FAKE, reason="counts host syncs with the CuPy stand-in "
                                                 "(TINYGRAD_LLM_FAKE_CUDA=1)")
if FAKE:
    import fakecupy as fake

# the budgets: what the code promises (docs/gpu.md)
TRAIN_STEP_SYNCS = 1  # the step's loss and gradient norm, read together (log, checks, clipping)
DECODE_STEP_SYNCS = 1  # the sampled ids (B,), read once per new token

TEXT = "to be or not to be, that is the question. " * 40
TOKENIZER = CharTokenizer.from_text(TEXT)
TOKENS = np.array(TOKENIZER.encode(TEXT), dtype=np.uint16)


def trainer(tmp_path, grad_accum_steps=1, lora=False, dtype="float32", **model):
    backend.manual_seed(0)
    config = PretrainConfig(max_steps=10, batch_size=4, grad_accum_steps=grad_accum_steps,
                            learning_rate=3e-3, warmup_steps=2, eval_interval=100,
                            eval_batches=1, sample_tokens=0, seed=0, grad_clip=1.0, dtype=dtype)
    settings = {"vocab_size": TOKENIZER.vocab_size, "context_length": 16, "n_layer": 2,
                "n_head": 2, "n_embd": 16, "dropout": 0.1, **model}
    gpt = GPT(GPTConfig(**settings)).to("cuda")
    if lora:
        apply_lora(gpt, rank=4, targets=("c_attn", "c_fc", "lm_head"), dropout=0.1)
    task = LanguageModelingTask(TOKENIZER, TOKENS[:1500], TOKENS[1500:], 16, config)
    return Trainer(gpt, task, config, tmp_path, show_progress=False, log=lambda line: None)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("grad_accum_steps", [1, 3])
@pytest.mark.parametrize("model", [{}, {"tie_weights": False}], ids=["tied", "untied"])
def test_a_training_step_reads_the_device_once(tmp_path, grad_accum_steps, model, dtype):
    # forward, fused head and loss, backward (embedding rows added without a host read),
    # global-norm clipping, AdamW, dropout masks; float16: loss scaling and the overflow check
    # (the gradients' norm comes back with the loss, in the same read)
    run = trainer(tmp_path, grad_accum_steps, dtype=dtype, **model)
    run.train_step()  # the first step allocates the optimizer's state
    with fake.count_syncs() as syncs:
        for _ in range(3):
            run.train_step()
    assert syncs.count <= 3 * TRAIN_STEP_SYNCS


def test_a_lora_training_step_reads_the_device_once(tmp_path):
    run = trainer(tmp_path, lora=True, tie_weights=False)
    run.train_step()
    with fake.count_syncs() as syncs:
        for _ in range(3):
            run.train_step()
    assert syncs.count <= 3 * TRAIN_STEP_SYNCS


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"top_k": 5},
                                      {"top_p": 0.9, "temperature": 0.8}],
                         ids=["greedy", "top-k", "top-p"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_each_decoded_token_reads_the_device_once(sampling, use_cache):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, context_length=16, n_layer=2,
                          n_head=2, n_embd=16)).to("cuda")
    prompts = [TOKENIZER.encode("to be"), TOKENIZER.encode("that is the")]  # left-padded batch
    steps = 0
    with fake.count_syncs() as syncs:  # the prefill, then one position per step
        for _ in generate_tokens(model, prompts, 20, seed=0, use_cache=use_cache, **sampling):
            steps += 1  # 20 tokens: past the 16-token window, so the cache is rebuilt too
    assert steps == 20
    assert syncs.count <= steps * DECODE_STEP_SYNCS
