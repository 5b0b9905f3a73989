"""The chat loop: prompt template, history within the window, /reset, /quit, Ctrl-C."""

from tinygrad_llm import backend
from tinygrad_llm.finetune.instruction import PREAMBLE, format_prompt
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.tokenizer import GPT2Tokenizer
from tinygrad_llm.train.chat import ChatSession, chat_loop

OPTIONS = dict(max_new_tokens=5, temperature=0, top_k=None, top_p=None, seed=0, use_cache=True)


def session(context_length=200):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=context_length, n_layer=1, n_head=1,
                          n_embd=8))
    return ChatSession(model, GPT2Tokenizer(), dict(OPTIONS))


def test_alpaca_prompt_with_history():
    prompt = format_prompt("And Spain?", history=[("Capital of France?", "Paris.")])
    assert prompt == (f"{PREAMBLE}\n\n### Instruction:\nCapital of France?\n\n### Response:\n"
                      "Paris.\n\n### Instruction:\nAnd Spain?\n\n### Response:\n")


def test_old_turns_are_dropped_to_fit_the_window():
    chat = session(context_length=80)
    chat.history = [(f"question {i} " * 3, f"answer {i} " * 3) for i in range(10)]
    prompt = chat.prompt_for("last question")
    tokens = len(chat.tokenizer.encode(prompt))
    assert tokens <= 80 - OPTIONS["max_new_tokens"]
    assert "answer 9" in prompt and "answer 0" not in prompt  # the newest turns survive


def test_loop_answers_resets_and_quits():
    chat = session()
    inputs = iter(["hello", "/reset", "again", "/quit", "never read"])
    out = []
    chat_loop(chat, read=lambda prompt: next(inputs), write=out.append)
    text = "".join(out)
    assert text.count("model> ") == 2 and "(conversation forgotten)" in text
    assert [q for q, _ in chat.history] == ["again"]  # /reset forgot "hello"


def test_ctrl_c_stops_the_answer_but_not_the_session():
    chat = session()

    def interrupted_reply(message):
        yield "partial"
        raise KeyboardInterrupt

    chat.reply = interrupted_reply
    inputs = iter(["tell me a story", "/quit"])
    out = []
    chat_loop(chat, read=lambda prompt: next(inputs), write=out.append)
    assert "partial [stopped]" in "".join(out)


def test_end_of_input_leaves_the_loop():
    def eof(prompt):
        raise EOFError

    chat_loop(session(), read=eof, write=lambda text: None)


def test_a_message_the_tokenizer_cannot_encode_is_reported_not_fatal():
    from tinygrad_llm.tokenizer import CharTokenizer

    chat = session()
    chat.tokenizer = CharTokenizer("abcdefgh \n")  # no '#', so the Alpaca template fails
    inputs = iter(["abc", "/quit"])
    out = []
    chat_loop(chat, read=lambda prompt: next(inputs), write=out.append)
    assert "cannot answer" in "".join(out)
    plain = ChatSession(chat.model, chat.tokenizer, dict(OPTIONS), template="plain")
    assert plain.prompt_for("abc") == "abc\n"
