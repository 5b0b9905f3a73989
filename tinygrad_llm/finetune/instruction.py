"""Instruction finetuning: data, prompt templates, the book's collate, and the training task.

An example is a conversation: an optional system message, then user and assistant turns. The
Alpaca shape (``instruction``, ``input``, ``output``) is one user turn and one answer. A
*template* turns a conversation into text; the model learns to continue the prompt with the
answer and then the end-of-text token:

    alpaca   Below is an instruction that describes a task. Write a response that ...
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{answer}
    phi3     <|user|>\n{instruction}\n\n{input}<|end|>\n<|assistant|>\n{answer}
    chatml   <|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n{answer}

With several turns the earlier answers are part of the prompt and the model learns the last one.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import read_jsonl, write_jsonl
from ..generate import cut_at_stop, generate
from ..loading import save_model
from ..trainer import EpochBatches, EpochConfig, EpochTask

INSTRUCTION_DATA = Path(__file__).resolve().parents[1] / "assets" / "instruction-data.json"
IGNORE_INDEX = -100  # targets that the loss leaves out (F.cross_entropy's default)

PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.")
INSTRUCTION, INPUT, RESPONSE = "### Instruction:", "### Input:", "### Response:"
STOP_STRINGS = ("\n### Instruction:", "\n### Input:", "\n### Response:", "<|endoftext|>")


# ================================================================================== data
def _message(record: dict, where: str) -> dict:
    if not isinstance(record, dict) or record.get("role") not in ("system", "user", "assistant") \
            or not isinstance(record.get("content"), str):
        raise ValueError(f"{where}: each message needs a 'role' (system, user or assistant) and "
                         "a string 'content'")
    return {"role": record["role"], "content": record["content"]}


def to_conversation(record, where: str) -> list[dict]:
    """A record in the Alpaca or the chat shape as a list of messages (the last one an
    assistant answer). An Alpaca input travels with its user message as ``"input"``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' should be a non-empty list")
        messages = [_message(m, f"{where}, message {i + 1}") for i, m in enumerate(messages)]
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if messages[-1]["role"] != "assistant" or "user" not in roles:
            raise ValueError(f"{where}: a conversation needs a user message and must end with "
                             "the assistant's answer")
        return messages
    missing = [key for key in ("instruction", "output") if not isinstance(record.get(key), str)]
    if missing or not isinstance(record.get("input", ""), str):
        raise ValueError(f"{where}: expected the Alpaca keys 'instruction', 'input' (optional) "
                         f"and 'output' as strings, or 'messages'; missing or not text: "
                         f"{', '.join(missing) or 'input'}")
    return [{"role": "user", "content": record["instruction"], "input": record.get("input", "")},
            {"role": "assistant", "content": record["output"]}]


def read_records(path) -> list[dict]:
    """The raw records of a .json file (a list of objects) or a .jsonl file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}); use a "
                         "JSON list of records or JSONL, one record per line") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [(record, f"{path}, record {i + 1}") for i, record in enumerate(data)]


def load_instruction_data(path=INSTRUCTION_DATA) -> list[dict]:
    """Examples as ``{"messages": [...], "record": original}``; a malformed record is an error
    that names it (file and line or record number)."""
    return [{"messages": to_conversation(record, where), "record": record}
            for record, where in read_records(path)]


def split_examples(examples: list, seed: int = 123, fractions=(0.85, 0.10)) -> dict:
    """Shuffle with a seed and cut: 85% train, 10% test, the rest (5%) validation (the book's
    proportions)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_train, n_test = int(len(examples) * fractions[0]), int(len(examples) * fractions[1])
    pick = lambda indices: [examples[i] for i in indices]  # noqa: E731
    return {"train": pick(order[:n_train]), "test": pick(order[n_train:n_train + n_test]),
            "val": pick(order[n_train + n_test:])}


def write_splits(directory, splits: dict) -> None:
    """``DIR/{train,val,test}.jsonl`` with the original records, so an evaluation can find the
    same test set later."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        write_jsonl(directory / f"{name}.jsonl", [e["record"] for e in examples])


# ============================================================================= templates
def _user_text(message: dict) -> str:
    extra = message.get("input", "")
    return message["content"] + (f"\n\n{extra}" if extra else "")


def _tagged(messages, header: str, end: str) -> str:
    """The chat formats that wrap every turn in tags (phi3, chatml): ``header`` (with the role)
    + content + ``end``; after a user turn, the assistant's header opens the answer."""
    text = ""
    for m in messages:
        if m["role"] == "assistant":
            text += f"{m['content']}{end}"
        else:
            content = _user_text(m) if m["role"] == "user" else m["content"]
            text += header.format(role=m["role"]) + content + end
            if m["role"] == "user":
                text += header.format(role="assistant")
    return text


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text, and the strings that end a generated answer."""

    name: str
    stop: tuple = field(default=())

    def prompt(self, messages: list[dict]) -> str:
        """The text up to where the model writes the next answer (``messages`` end with a user
        turn, or with an assistant turn that is dropped)."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return getattr(self, f"_{self.name}")(messages)

    def _alpaca(self, messages) -> str:
        system = [m["content"] for m in messages if m["role"] == "system"]
        text = (system[0] if system else PREAMBLE) + "\n\n"
        for m in messages:
            if m["role"] == "user":
                text += f"{INSTRUCTION}\n{m['content']}\n\n"
                if m.get("input"):
                    text += f"{INPUT}\n{m['input']}\n\n"
                text += f"{RESPONSE}\n"
            elif m["role"] == "assistant":
                text += f"{m['content']}\n\n"
        return text

    def _phi3(self, messages) -> str:
        return _tagged(messages, header="<|{role}|>\n", end="<|end|>\n")

    def _chatml(self, messages) -> str:
        return _tagged(messages, header="<|im_start|>{role}\n", end="<|im_end|>\n")

    def leaks(self, text: str) -> bool:
        """Whether generated text contains the template's own markers."""
        return any(s.strip() and s.strip() in text for s in self.stop)


TEMPLATES = {
    "alpaca": Template("alpaca", STOP_STRINGS),
    "phi3": Template("phi3", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
                              "<|endoftext|>")),
    "chatml": Template("chatml", ("<|im_end|>", "<|im_start|>", "<|endoftext|>")),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def format_turn(instruction: str, input_text: str = "", response: str | None = None) -> str:
    """One Alpaca instruction/response turn; without ``response`` it ends where the model
    continues."""
    text = f"{INSTRUCTION}\n{instruction}\n\n"
    if input_text:
        text += f"{INPUT}\n{input_text}\n\n"
    text += f"{RESPONSE}\n"
    if response is not None:
        text += f"{response}\n\n"
    return text


def format_prompt(instruction: str, input_text: str = "", history=()) -> str:
    """The whole Alpaca prompt: preamble, earlier (instruction, response) turns, the new one."""
    turns = "".join(format_turn(question, response=answer) for question, answer in history)
    return f"{PREAMBLE}\n\n{turns}{format_turn(instruction, input_text)}"


def encode_example(example: dict, tokenizer, template: Template) -> tuple[list[int], int]:
    """(token ids of prompt + answer, number of prompt tokens); no end token (collate adds it)."""
    prompt = tokenizer.encode(template.prompt(example["messages"]))
    answer = tokenizer.encode(example["messages"][-1]["content"])
    return prompt + answer, len(prompt)


# =============================================================================== collate
def collate(sequences, pad_id: int, ignore_index: int = IGNORE_INDEX, max_length=None,
            prompt_lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """Batch whole examples for next-token training, as the book's ch07 collate does.

    Args:
        sequences: lists of token ids (prompt + response, no end token), any lengths.
        pad_id: the end-of-text id: appended once to every sequence, and used as padding.
        max_length: cut inputs and targets to this many positions (a warning says how many
            examples lost tokens).
        prompt_lengths: with it, the targets of the first ``prompt_lengths[i] - 1`` positions
            of row i are ignored too: the loss covers the response only.
    Returns (inputs, targets), int64 (B, T): ``targets[i, t]`` is the token after
    ``inputs[i, t]``; the first end token of a row is a target (the model learns to stop),
    padding after it is ``ignore_index``.
    """
    width = max(len(s) for s in sequences) + 1  # + the end token
    padded = np.full((len(sequences), width), pad_id, dtype=np.int64)  # (B, L + 1)
    for row, sequence in enumerate(sequences):
        padded[row, :len(sequence)] = sequence
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()  # (B, L) each
    for row, sequence in enumerate(sequences):
        targets[row, len(sequence):] = ignore_index  # after the end token: padding
        if prompt_lengths is not None:
            targets[row, :max(prompt_lengths[row] - 1, 0)] = ignore_index
    if max_length is not None and width - 1 > max_length:
        cut = sum(len(s) > max_length for s in sequences)
        warnings.warn(f"collate: {cut} of {len(sequences)} sequences were longer than "
                      f"max_length={max_length} tokens and were cut", stacklevel=2)
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


# ================================================================================ training
@dataclass
class InstructConfig(EpochConfig):
    """Instruction finetuning: the shared step and loop settings, by epochs."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 5e-4
    min_lr: float = 5e-5
    weight_decay: float = 0.1
    beta2: float = 0.999
    template: str = "alpaca"
    mask_prompt: bool = False  # loss on the response tokens only
    max_length: int | None = None  # default: the model's context length
    eval_every_epochs: float = 0.5  # evaluate every half epoch
    seed: int = 123


class InstructionTask(EpochTask):
    """Encoded examples for the shared Trainer: shuffled batches epoch after epoch through
    ``collate``; the mean token loss on the validation split (and on as many training
    examples) at each evaluation."""

    def __init__(self, train: list, val: list, tokenizer, config: InstructConfig,
                 max_length: int, save=None):
        self.train, self.val, self.config = train, val, config
        self.pad_id, self.max_length = tokenizer.eot_token, max_length
        self.train_sample = train[:len(val)]  # a fixed slice: comparable across evaluations
        self.batches = EpochBatches(len(train), config.batch_size, config.seed)
        self._save = save

    def batch(self, examples: list):
        sequences = [ids for ids, _ in examples]
        prompts = [n for _, n in examples] if self.config.mask_prompt else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the command reports cut examples once, up front
            return collate(sequences, self.pad_id, max_length=self.max_length,
                           prompt_lengths=prompts)

    def next_batch(self):
        return self.batch([self.train[i] for i in self.batches.next()])

    def loss(self, model, batch):
        inputs, targets = batch
        return model.loss(inputs, targets)

    def mean_loss(self, model, examples: list, batch_size: int = 16) -> float:
        """Token-weighted mean loss over ``examples`` (every counted token weighs the same)."""
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            inputs, targets = self.batch(examples[start:start + batch_size])
            n = int((targets != IGNORE_INDEX).sum())
            if n:
                total += model.loss(inputs, targets).item() * n
                count += n
        return total / max(count, 1)

    def evaluate(self, model) -> dict:
        return {"epoch": self.epoch, "train_loss": self.mean_loss(model, self.train_sample),
                "val_loss": self.mean_loss(model, self.val)}


def respond(model, tokenizer, template: Template, examples: list, max_new_tokens: int,
            batch_size: int = 16) -> list[dict]:
    """Greedy answers to each example's prompt, with a ``well_formed`` verdict: non-empty,
    ended by the end-of-text token or a stop string (not by the token limit), and no template
    text in it."""
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer.encode(template.prompt(e["messages"])) for e in chunk]
        window = model.config.context_length
        prompts = [p[-(window - 1):] for p in prompts]  # room for at least one new token
        outputs = generate(model, prompts, max_new_tokens, temperature=0,
                           eos_token=tokenizer.eot_token)
        for example, ids in zip(chunk, outputs, strict=True):
            text, stopped = cut_at_stop(tokenizer.decode(ids), template.stop)
            ended = stopped or len(ids) < max_new_tokens
            response = text.strip()
            record = example["record"]
            results.append({
                "instruction": record.get("instruction", _last_user(example["messages"])),
                "input": record.get("input", ""),
                "output": record.get("output", example["messages"][-1]["content"]),
                "model_response": response,
                "well_formed": bool(response) and ended and not template.leaks(response),
            })
    return results


def _last_user(messages: list) -> str:
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def save_instruct_model(directory, model, tokenizer, template: str, extra=None, state=None,
                        optimizer=None):
    """A checkpoint that remembers its template (generate, chat and serve use it)."""
    return save_model(directory, model, tokenizer, state, optimizer,
                      extra={"template": template, **(extra or {})})
