"""Instruction finetuning: data shapes, templates, the book's collate, and the command."""

import json
import warnings

import numpy as np
import pytest
from conftest import DEVICES

from tinygrad_llm import backend
from tinygrad_llm.finetune.instruction import (
    IGNORE_INDEX,
    PREAMBLE,
    TEMPLATES,
    collate,
    encode_example,
    load_instruction_data,
    split_examples,
)
from tinygrad_llm.loading import load_model, save_model
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import GPT2Tokenizer
from tinygrad_llm.train.cli import main

X = IGNORE_INDEX


# ------------------------------------------------------------------------------ collate
def test_collate_appends_one_end_token_pads_and_shifts():
    inputs, targets = collate([[1, 2, 3], [4, 5]], pad_id=9)
    assert inputs.dtype == np.int64 and targets.dtype == np.int64
    assert inputs.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert targets.tolist() == [[2, 3, 9], [5, 9, X]]  # the first end token is a target


def test_collate_masks_the_prompt_and_cuts_to_max_length():
    _, targets = collate([[1, 2, 3, 4], [5, 6]], pad_id=0, prompt_lengths=[3, 1])
    assert targets.tolist() == [[X, X, 4, 0], [6, 0, X, X]]  # row 0: tokens 2, 3 are prompt
    with pytest.warns(UserWarning, match="1 of 2 sequences were longer than max_length=3"):
        inputs, targets = collate([[1, 2, 3, 4, 5], [6, 7]], pad_id=0, max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [6, 7, 0]]
    assert targets.tolist() == [[2, 3, 4], [7, 0, X]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut: no warning
        collate([[1, 2], [3]], pad_id=0, max_length=3)


def test_collate_uses_a_custom_ignore_index():
    _, targets = collate([[1], [2, 3, 4]], pad_id=7, ignore_index=-1)
    assert targets.tolist() == [[7, -1, -1], [3, 4, 7]]


# --------------------------------------------------------------------- data, templates
def test_bundled_data_splits_85_10_5_with_a_seed():
    examples = load_instruction_data()
    assert len(examples) == 1100
    splits = split_examples(examples, seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "test": 110, "val": 55}
    again = split_examples(examples, seed=123)
    assert again["test"][0]["record"] == splits["test"][0]["record"]


def test_malformed_records_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n"
                   + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(ValueError, match="line 2.*output"):
        load_instruction_data(bad)
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(ValueError, match="record 1: a conversation .* must end with"):
        load_instruction_data(chat)
    chat.write_text(json.dumps([{"messages": [{"role": "bot", "content": "hi"}]}]))
    with pytest.raises(ValueError, match="record 1, message 1"):
        load_instruction_data(chat)
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a",\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_instruction_data(tmp_path / "broken.jsonl")


def test_the_three_templates_render_a_turn_with_input():
    record = {"instruction": "Add.", "input": "2 + 2", "output": "4"}
    (example,) = [{"messages": [{"role": "user", "content": "Add.", "input": "2 + 2"},
                                {"role": "assistant", "content": "4"}], "record": record}]
    assert TEMPLATES["alpaca"].prompt(example["messages"]) == (
        f"{PREAMBLE}\n\n### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n")
    assert TEMPLATES["phi3"].prompt(example["messages"]) == (
        "<|user|>\nAdd.\n\n2 + 2<|end|>\n<|assistant|>\n")
    assert TEMPLATES["chatml"].prompt(example["messages"]) == (
        "<|im_start|>user\nAdd.\n\n2 + 2<|im_end|>\n<|im_start|>assistant\n")
    ids, prompt_length = encode_example(example, GPT2Tokenizer(), TEMPLATES["alpaca"])
    assert GPT2Tokenizer().decode(ids[prompt_length:]) == "4"


def test_multi_turn_chat_keeps_earlier_answers_in_the_prompt():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    assert TEMPLATES["chatml"].prompt(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")


# ---------------------------------------------------------------------------- command
@pytest.fixture
def tiny_base(tmp_path):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=128, n_layer=1, n_head=2, n_embd=16,
                          tie_weights=False))
    save_model(tmp_path / "base", model, GPT2Tokenizer())
    data = tmp_path / "data.jsonl"
    records = [{"instruction": f"Say {word}.", "input": "", "output": word}
               for word in ("yes", "no", "maybe", "ok", "fine") * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_instruct_learns_and_writes_its_outputs(tiny_base, capsys, device):
    out = tiny_base / "sft"
    assert main(["finetune-instruct", "--checkpoint", str(tiny_base / "base"), "--out", str(out),
                 "--data", str(tiny_base / "data.jsonl"), "--epochs", "3", "--lr", "3e-3",
                 "--batch-size", "4", "--max-new-tokens", "8", "--device", device,
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("initial_val_loss", "initial_test_loss", "val_loss", "test_loss",
                "test_perplexity", "trainable_params", "total_params", "wall_seconds",
                "well_formed_rate"):
        assert key in metrics
    assert metrics["test_loss"] < metrics["initial_test_loss"]
    responses = [json.loads(line) for line in (out / "test-responses.jsonl").read_text()
                 .splitlines()]
    assert len(responses) == metrics["splits"]["test"] == 4
    assert set(responses[0]) == {"instruction", "input", "output", "model_response",
                                 "well_formed"}
    assert len((out / "data" / "test.jsonl").read_text().splitlines()) == 4
    _, _, checkpoint = load_model(out / "checkpoint", device)
    assert checkpoint["config"]["template"] == "alpaca"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Say yes.", "--temperature",
                 "0", "--max-new-tokens", "6", "--device", device]) == 0
    answer = capsys.readouterr().out
    assert "###" not in answer and "Say yes." not in answer  # wrapped in the template: the answer
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Say yes.", "--raw",
                 "--temperature", "0", "--max-new-tokens", "6", "--device", device]) == 0
    assert capsys.readouterr().out.startswith("Say yes.")
