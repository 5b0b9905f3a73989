"""Chat with a model in the terminal: multi-turn, streamed, Alpaca-style prompts.

    tinygrad-llm chat --checkpoint DIR

Commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves. Ctrl-C stops the current
answer and keeps the session. Older turns are dropped when the conversation outgrows the
model's context window. ``--template plain`` sends the bare conversation instead of Alpaca
prompts (for models that never saw the template, e.g. a character model without '#').
"""

from __future__ import annotations

import argparse
import sys

from tinygrad_llm.finetune.instruction import STOP_STRINGS, format_prompt
from tinygrad_llm.generate import stream_text
from tinygrad_llm.loading import load_model
from tinygrad_llm.train.sample import add_sampling_arguments, sampling_options


def format_plain(message: str, history=()) -> str:
    """The bare conversation, one line per turn: for models that never saw a template."""
    return "".join(f"{question}\n{answer}\n\n" for question, answer in history) + message + "\n"


TEMPLATES = {"alpaca": (format_prompt, STOP_STRINGS), "plain": (format_plain, ("\n\n",))}


class ChatSession:
    """The conversation so far and how to turn it into a prompt that fits the window."""

    def __init__(self, model, tokenizer, options: dict, template: str = "alpaca"):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.format, self.stop = TEMPLATES[template]
        self.history: list[tuple[str, str]] = []

    def prompt_for(self, message: str) -> str:
        """The prompt for ``message``, keeping as many recent turns as fit with the answer."""
        budget = self.model.config.context_length - self.options["max_new_tokens"]
        history = list(self.history)
        while True:
            prompt = self.format(message, history=history)
            if not history or len(self.tokenizer.encode(prompt)) <= budget:
                return prompt  # with no history left, generation crops the prompt itself
            history.pop(0)  # forget the oldest turn

    def reply(self, message: str):
        """Stream the answer to ``message``; it joins the history when done or interrupted."""
        prompt = self.prompt_for(message)  # raises ValueError if the tokenizer cannot encode it
        answer = []
        try:
            for piece in stream_text(self.model, self.tokenizer, prompt, stop=self.stop,
                                     **self.options):
                answer.append(piece)
                yield piece
        finally:
            self.history.append((message, "".join(answer).strip()))

    def reset(self) -> None:
        self.history.clear()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a Hugging Face GPT-2 folder")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="alpaca",
                        help="prompt format: Alpaca instructions, or the plain conversation")
    add_sampling_arguments(parser)


def chat_loop(session: ChatSession, read=input, write=sys.stdout.write) -> None:
    write("Chat started. /reset forgets the conversation, /quit leaves, Ctrl-C stops an "
          "answer.\n")
    while True:
        try:
            message = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(type /quit to leave)\n")
            continue
        if message in ("/quit", "/exit"):
            return
        if message == "/reset":
            session.reset()
            write("(conversation forgotten)\n")
            continue
        if not message:
            continue
        write("model> ")
        try:
            for piece in session.reply(message):
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [stopped]")
        except ValueError as error:  # e.g. a character the model's tokenizer does not know
            write(f"(cannot answer: {error})")
        write("\n")


def run(args) -> int:
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    options = sampling_options(args)
    chat_loop(ChatSession(model, tokenizer, options, args.template))
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
