"""Instruction prompts in the Alpaca format: the template that chat and instruction
finetuning share.

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.

    ### Instruction:
    {instruction}

    ### Input:            (only when there is an input)
    {input}

    ### Response:
    {response}
"""

from __future__ import annotations

PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.")
INSTRUCTION, INPUT, RESPONSE = "### Instruction:", "### Input:", "### Response:"
STOP_STRINGS = ("\n### Instruction:", "\n### Input:", "\n### Response:", "<|endoftext|>")


def format_turn(instruction: str, input_text: str = "", response: str | None = None) -> str:
    """One instruction/response turn; without ``response`` it ends where the model continues."""
    text = f"{INSTRUCTION}\n{instruction}\n\n"
    if input_text:
        text += f"{INPUT}\n{input_text}\n\n"
    text += f"{RESPONSE}\n"
    if response is not None:
        text += f"{response}\n\n"
    return text


def format_prompt(instruction: str, input_text: str = "", history=()) -> str:
    """The whole prompt: preamble, earlier (instruction, response) turns, then the new one."""
    turns = "".join(format_turn(question, response=answer) for question, answer in history)
    return f"{PREAMBLE}\n\n{turns}{format_turn(instruction, input_text)}"
