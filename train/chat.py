"""Chat with a model in the terminal: multi-turn, streamed, in the model's prompt template.

    tinygrad-llm chat --checkpoint DIR

Commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves. Ctrl-C stops the current
answer and keeps the session. Older turns are dropped when the conversation outgrows the
model's context window. A model from finetune-instruct is prompted in the template it was
trained with; others in Alpaca's. ``--template plain`` sends the bare conversation instead (for
models that never saw a template, e.g. a character model without '#').
"""

from __future__ import annotations

import argparse
import sys

from tinygrad_llm.finetune.instruction import TEMPLATES as INSTRUCTION_TEMPLATES
from tinygrad_llm.generate import stream_text
from tinygrad_llm.loading import load_model
from tinygrad_llm.train.sample import add_sampling_arguments, sampling_options


class PlainTemplate:
    """The bare conversation, one line per turn: for models that never saw a template."""

    name, stop = "plain", ("\n\n",)

    def prompt(self, messages: list[dict]) -> str:
        turns = [m["content"] for m in messages if m["role"] != "system"]
        return "".join(f"{t}\n" + ("\n" if i % 2 else "") for i, t in enumerate(turns))


TEMPLATES = {**INSTRUCTION_TEMPLATES, "plain": PlainTemplate()}


class ChatSession:
    """The conversation so far and how to turn it into a prompt that fits the window."""

    def __init__(self, model, tokenizer, options: dict, template: str = "alpaca"):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.template = TEMPLATES[template]
        self.stop = self.template.stop
        self.history: list[tuple[str, str]] = []

    def prompt_for(self, message: str) -> str:
        """The prompt for ``message``, keeping as many recent turns as fit with the answer."""
        budget = self.model.config.context_length - self.options["max_new_tokens"]
        history = list(self.history)
        while True:
            messages = [m for question, answer in history
                        for m in ({"role": "user", "content": question},
                                  {"role": "assistant", "content": answer})]
            prompt = self.template.prompt(messages + [{"role": "user", "content": message}])
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
    parser.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                        help="prompt format (default: the one the model was finetuned with, "
                             "else alpaca); plain: the bare conversation")
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
    model, tokenizer, checkpoint = load_model(args.checkpoint, args.device)
    template = args.template or checkpoint["config"].get("template") or "alpaca"
    options = sampling_options(args)
    chat_loop(ChatSession(model, tokenizer, options, template))
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
