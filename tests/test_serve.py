"""The OpenAI-compatible server, driven by the official openai client over real HTTP."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinygrad_llm import backend  # noqa: E402
from tinygrad_llm.finetune.instruction import TEMPLATES, save_instruct_model  # noqa: E402
from tinygrad_llm.generate import generate_text  # noqa: E402
from tinygrad_llm.loading import load_model, save_model  # noqa: E402
from tinygrad_llm.models.gpt import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.serve import QueueFull, Request, Worker, create_app, running_server  # noqa: E402
from tinygrad_llm.serve.app import plain_prompt  # noqa: E402
from tinygrad_llm.tokenizer import GPT2Tokenizer  # noqa: E402

CONTEXT = 64
MESSAGES = [{"role": "user", "content": "Say yes."}]


def tiny_gpt():
    backend.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, context_length=CONTEXT, n_layer=2, n_head=2, n_embd=16,
                         tie_weights=False))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_instruct_model(root / "sft", tiny_gpt(), GPT2Tokenizer(), "alpaca")
    save_model(root / "base", tiny_gpt(), GPT2Tokenizer())
    return root


@pytest.fixture(scope="module")
def server(checkpoints):
    app = create_app(checkpoints / "sft", model_name="tiny", max_batch=4, max_body_bytes=20_000)
    with running_server(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def chat(client, **options):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **options)


def expected_chat(checkpoints, max_tokens):
    """What the library's own generate gives for MESSAGES, greedy."""
    model, tokenizer, _ = load_model(checkpoints / "sft")
    template = TEMPLATES["alpaca"]
    return generate_text(model, tokenizer, template.prompt(MESSAGES), max_tokens, temperature=0,
                         stop=template.stop)


# ------------------------------------------------------------------------- endpoints
def test_health_and_models_name_the_model(server, client):
    assert httpx.get(server[1] + "/health").json() == {"status": "ok", "model": "tiny"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_is_greedy_at_temperature_0_and_matches_generate(client, checkpoints):
    reply = chat(client, temperature=0, max_tokens=6)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected_chat(checkpoints, 6)
    assert reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_completion_reports_usage_and_length(client):
    reply = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5,
                                      temperature=0, n=2)
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both choices agree
    assert reply.usage.prompt_tokens == 2
    if reply.usage.completion_tokens == 10:
        assert {c.finish_reason for c in reply.choices} == {"length"}


def test_seed_makes_sampling_repeatable(client):
    first, second = (client.completions.create(model="tiny", prompt="Once", max_tokens=6,
                                               temperature=1.0, seed=7) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text


def test_stop_string_cuts_the_reply(client):
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=8,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                      stop=[stop])
    assert reply.choices[0].text == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_streaming_chat_sends_deltas_then_done(server, client, checkpoints):
    chunks = list(chat(client, temperature=0, max_tokens=6, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_chat(checkpoints, 6)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    raw = httpx.post(server[1] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                          "stream": True}).text
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_a_client_that_disconnects_stops_its_generation(server):
    app, url = server
    worker, jobs = app.state.worker, []
    submit = worker.submit
    worker.submit = lambda job: (jobs.append(job), submit(job))
    try:
        body = {"prompt": "Hi", "max_tokens": CONTEXT - 2, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", url + "/v1/completions", json=body) as reply:
            next(reply.iter_lines())
    finally:
        worker.submit = submit
    deadline = time.monotonic() + 5
    while not (jobs[0].cancelled.is_set() and not worker.active) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs[0].cancelled.is_set() and not worker.active


def test_twenty_concurrent_clients_all_finish_with_the_answer_they_get_alone(client,
                                                                             checkpoints):
    alone = expected_chat(checkpoints, 5)
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: chat(client, temperature=0, max_tokens=5), range(20)))
    assert [r.choices[0].message.content for r in replies] == [alone] * 20


# ---------------------------------------------------------------------------- errors
def assert_error(error, status, param=None):
    assert error.value.status_code == status
    body = error.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if param:
        assert body["param"] == param
    return body


@pytest.mark.parametrize("options, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": CONTEXT + 1}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": 5}, "stop"),
    ({"n": 0}, "n"),
])
def test_bad_parameters_are_400_in_openai_shape(client, options, param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, extra_body=options) if "temperature" in options or "stop" in options \
            else chat(client, **options)
    assert_error(error, 400, param)


def test_malformed_json_and_missing_fields_are_400(server):
    url = server[1] + "/v1/chat/completions"
    for body in (b"{not json", b"[1, 2]", json.dumps({"messages": []}).encode(),
                 json.dumps({"messages": [{"role": "user"}]}).encode(),
                 json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode()):
        reply = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, body
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_prompt_longer_than_the_context_says_the_limit(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="word " * (CONTEXT + 10), max_tokens=1)
    body = assert_error(error, 400, "prompt")
    assert f"context length is {CONTEXT} tokens" in body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert "tiny" in assert_error(error, 404, "model")["message"]


def test_body_over_the_limit_is_413(server):
    reply = httpx.post(server[1] + "/v1/completions",
                       json={"prompt": "x" * 30_000, "max_tokens": 1})
    assert reply.status_code == 413 and "20000 bytes" in reply.json()["error"]["message"]


def test_full_queue_is_429_with_retry_after(server, client):
    worker = server[0].state.worker
    submit = worker.submit

    def refuse(job):
        raise QueueFull("the server is busy")

    worker.submit = refuse
    try:
        with pytest.raises(openai.RateLimitError) as error:
            chat(client, max_tokens=2)
    finally:
        worker.submit = submit
    assert_error(error, 429)
    assert error.value.response.headers["retry-after"] == "1"


def test_worker_queue_is_bounded():
    worker = Worker(load=None, queue_size=1)  # never started: nothing takes from the queue
    worker.submit(Request([1], 1, print))
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        worker.submit(Request([1], 1, print))


def test_server_still_serves_after_bad_requests(server, client):
    for body in (b"\xff\xfe", b"{", b'{"prompt": 3}', b'{"prompt": "a", "max_tokens": 1e999}'):
        httpx.post(server[1] + "/v1/completions", content=body)
    assert httpx.get(server[1] + "/nowhere").json()["error"]["type"] == "not_found_error"
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_api_key_is_required_when_set(checkpoints):
    app = create_app(checkpoints / "sft", model_name="tiny", api_key="sesame")
    with running_server(app) as url:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            reply = httpx.get(url + "/v1/models", headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


# ----------------------------------------------------------------- loading, base models
def test_health_is_503_until_the_model_is_loaded(checkpoints):
    from fastapi.testclient import TestClient

    loaded = threading.Event()

    def slow_load():
        loaded.wait(10)
        model, tokenizer, _ = load_model(checkpoints / "base")
        return model, tokenizer, None

    with TestClient(create_app(load=slow_load, model_name="base")) as test_client:
        assert test_client.get("/health").status_code == 503
        reply = test_client.post("/v1/completions", json={"prompt": "hi"})
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "server_error"
        loaded.set()
        deadline = time.monotonic() + 10
        while test_client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert test_client.get("/health").status_code == 200
        assert test_client.get("/v1/info").json()["template"] is None
        reply = test_client.post("/v1/chat/completions",
                                 json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 4
        assert "<title>tinygrad_llm chat</title>" in test_client.get("/").text


def test_base_model_chat_prompt_is_the_plain_conversation():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert plain_prompt(messages) == "Hi\nHello\nBye\n"


def test_sequences_of_different_lengths_batch_like_they_run_alone(checkpoints):
    model, tokenizer, _ = load_model(checkpoints / "base")
    prompts = [[464], [464, 3290, 318, 257, 922], [15496, 11]]
    worker = Worker(lambda: (model, tokenizer), max_batch=3)
    worker.start()
    try:
        texts, finished = {}, []

        def emit_for(key):
            def emit(event):
                if event[0] == "text":
                    texts[key] = texts.get(key, "") + event[2]
                else:
                    finished.append(key)
            return emit

        for i, prompt in enumerate(prompts):
            worker.submit(Request(prompt, 6, emit_for(i), temperature=0))
        deadline = time.monotonic() + 10
        while len(finished) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    alone = [generate_text(model, tokenizer, tokenizer.decode(p), 6, temperature=0)
             for p in prompts]
    assert [texts.get(i, "") for i in range(3)] == alone
    assert np.all(worker.caches[0].lengths >= 0)


def test_missing_serve_extra_names_the_pip_command(monkeypatch, capsys, checkpoints):
    import sys

    from tinygrad_llm.train import serve
    from tinygrad_llm.train.cli import run_standalone

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert run_standalone(serve, ["--checkpoint", str(checkpoints / "sft")]) == 2
    assert "pip install 'tinygrad_llm[serve]'" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(capsys, checkpoints):
    import socket

    from tinygrad_llm.train import serve
    from tinygrad_llm.train.cli import run_standalone

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert run_standalone(serve, ["--checkpoint", str(checkpoints / "sft"), "--port",
                                      port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
