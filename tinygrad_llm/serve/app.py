"""The HTTP side: OpenAI's request and response shapes, errors, streaming, the chat page.

    GET  /health                200 once the model is loaded, 503 before
    GET  /v1/models             the one model this server holds
    POST /v1/completions        text in, text out (prompt: a string)
    POST /v1/chat/completions   messages rendered with the checkpoint's own template
    GET  /                      the chat page (static/chat.html)

Handlers validate a request, tokenize it, and hand it to the Worker (worker.py), whose thread
sends back text pieces; those become one JSON reply or server-sent events (``stream: true``).
Every error is OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import worker as work

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    """An error reply in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------- validation
def _field(body: dict, name: str, kinds, default=None, check=None, expected: str = ""):
    """body[name] if present and of one of ``kinds`` (and ``check(value)`` holds), else 400."""
    value = body.get(name)
    if value is None:
        return default
    bool_ok = bool in kinds
    ok = isinstance(value, kinds) and (bool_ok or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' should be {expected}, got {json.dumps(value)[:80]}",
                       param=name, code="invalid_value" if ok else "invalid_type")
    return value


def sampling_options(body: dict, context_length: int, default_max_tokens: int,
                     max_batch: int) -> dict:
    """The generation settings of a request body, checked (OpenAI's names and defaults)."""
    number, integer = (int, float), (int,)
    max_tokens = _field(body, "max_completion_tokens", integer, None,
                        lambda v: 1 <= v <= context_length,
                        f"an integer from 1 to the context length {context_length}")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", integer, default_max_tokens,
                            lambda v: 1 <= v <= context_length,
                            f"an integer from 1 to the context length {context_length}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4
            and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' should be a non-empty string or a list of up to 4 of them",
                       param="stop", code="invalid_type")
    stream_options = _field(body, "stream_options", (dict,), {}, None, "an object")
    top_k = _field(body, "top_k", integer, None, lambda v: v >= 0, "an integer >= 0")
    return {
        "max_tokens": max_tokens,
        "temperature": float(_field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2,
                                    "a number from 0 to 2")),
        "top_p": float(_field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1,
                              "a number in (0, 1]")),
        "top_k": top_k or None,  # 0 means no limit
        "stop": stop,
        "seed": _field(body, "seed", integer, None, lambda v: v >= 0, "an integer >= 0"),
        "n": _field(body, "n", integer, 1, lambda v: 1 <= v <= max_batch,
                    f"an integer from 1 to {max_batch} (this server's batch size)"),
        "stream": _field(body, "stream", (bool,), False, None, "true or false"),
        "include_usage": bool(_field(stream_options, "include_usage", (bool,), False, None,
                                     "true or false")),
    }


def check_messages(body: dict) -> list[dict]:
    """The 'messages' of a chat request: a non-empty list of {role, content} objects."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' should be a non-empty list of {role, content} objects",
                       param="messages", code="invalid_type" if messages else "missing")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] should be an object", param=f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}].role should be system, user or assistant, got "
                           f"{json.dumps(role)}", param=f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content should be a string",
                           param=f"messages[{i}].content")
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    return checked


def plain_prompt(messages: list[dict]) -> str:
    """A base model's prompt: the contents one after another, one line each."""
    return "".join(m["content"] + "\n" for m in messages)


# ---------------------------------------------------------------------------- the app
def create_app(checkpoint=None, device: str = "cpu", model_name: str | None = None,
               api_key: str | None = None, max_batch: int = 8, queue_size: int = 64,
               max_body_bytes: int = 1_000_000, load=None) -> FastAPI:
    """The server for one model.

    Args:
        checkpoint: a folder ``load_model`` reads (or give ``load``: () -> (model, tokenizer,
            template name or None)).
        model_name: the name clients send as ``model`` (default: the folder's name).
        api_key: when set, every /v1 request needs ``Authorization: Bearer <api_key>``.
        max_batch, queue_size: the worker's batch (slots) and waiting requests (then 429).
        max_body_bytes: larger request bodies are refused (413).
    """
    from ..finetune.instruction import get_template

    state = {"template": None}

    def load_checkpoint():
        if load is not None:
            model, tokenizer, template = load()
        else:
            from ..loading import load_model
            model, tokenizer, saved = load_model(checkpoint, device)
            template = saved["config"].get("template")
        state["template"] = get_template(template) if template else None
        return model, tokenizer

    name = model_name or (Path(checkpoint).resolve().name if checkpoint else "tinygrad-llm")
    worker = work.Worker(load_checkpoint, max_batch=max_batch, queue_size=queue_size)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="tinygrad_llm", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.model_name = worker, name

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                        type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request, error):
        return APIError(500, f"internal error: {error}", type="server_error").response()

    # ----------------------------------------------------------------- helpers
    def require_ready():
        if worker.load_error:
            raise APIError(503, worker.load_error, type="server_error")
        if not worker.ready.is_set():
            raise APIError(503, "the model is still loading; retry in a moment",
                           type="server_error", headers={"Retry-After": "1"})

    def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            what = "no API key was given" if not given else "the API key is wrong"
            raise APIError(401, f"{what}: send 'Authorization: Bearer <key>' with the key the "
                           "server was started with (--api-key)", type="authentication_error",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        """The request body as a JSON object, refusing bodies over max_body_bytes (413)."""
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is over this server's limit of "
                           f"{max_body_bytes} bytes (--max-body-bytes)", code="body_too_large")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body should be a JSON object")
        model = body.get("model")
        if model is not None and model != name:
            raise APIError(404, f"the model {json.dumps(model)[:80]} does not exist; this server "
                           f"serves {name!r} (GET /v1/models)", param="model",
                           code="model_not_found")
        return body

    def encode_prompt(text: str) -> list:
        try:
            ids = worker.tokenizer.encode(text)
        except (ValueError, KeyError) as error:  # e.g. a character a char tokenizer lacks
            raise APIError(400, f"the prompt cannot be tokenized for this model: {error}",
                           param="prompt") from None
        limit = worker.context_length
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        if len(ids) >= limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens, but this model's context "
                           f"length is {limit} tokens: shorten it to at most {limit - 1} tokens",
                           param="prompt", code="context_length_exceeded")
        return ids

    async def generate(request: Request, prompt_ids: list, options: dict, stop: tuple, shape):
        """Submit to the worker; a JSON reply, or server-sent events when streaming."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):  # called in the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutting down)
                job.cancelled.set()

        job = work.Request(prompt_ids, options["max_tokens"], emit,
                           options["temperature"], options["top_p"], options["top_k"], stop,
                           options["seed"], options["n"])
        try:
            worker.submit(job)
        except work.QueueFull as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        reply_id = f"{shape['prefix']}-{uuid.uuid4().hex[:24]}"
        base = {"id": reply_id, "object": shape["object"], "created": int(time.time()),
                "model": name}

        async def pieces():
            """(index, text, finish_reason) until every choice is done; cancels on exit."""
            done = 0
            try:
                while done < options["n"]:
                    event = await events.get()
                    if event[0] == "error":
                        raise RuntimeError(event[1])
                    if event[0] == "text":
                        yield event[1], event[2], None
                    else:
                        done += 1
                        usage["completion_tokens"] += event[3]
                        yield event[1], "", event[2]
            finally:
                job.cancelled.set()  # a client that went away stops its generation

        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0}

        def usage_dict():
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        if not options["stream"]:
            texts, reasons = [""] * options["n"], [None] * options["n"]
            try:
                async for index, text, reason in pieces():
                    texts[index] += text
                    reasons[index] = reason or reasons[index]
            except RuntimeError as error:
                raise APIError(500, str(error), type="server_error") from None
            choices = [shape["choice"](i, texts[i], reasons[i]) for i in range(options["n"])]
            return JSONResponse({**base, "choices": choices, "usage": usage_dict()})

        async def events_stream():
            chunk_object = shape["chunk_object"]
            if "first" in shape:
                for i in range(options["n"]):
                    first = {**base, "object": chunk_object, "choices": [shape["first"](i)]}
                    yield f"data: {json.dumps(first)}\n\n"
            try:
                async for index, text, reason in pieces():  # a disconnect cancels this task
                    chunk = {**base, "object": chunk_object,
                             "choices": [shape["delta"](index, text, reason)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            except RuntimeError as error:
                failure = APIError(500, str(error), type="server_error")
                yield f"data: {json.dumps(json.loads(failure.response().body))}\n\n"
                return
            if options["include_usage"]:
                final = {**base, "object": chunk_object, "choices": [], "usage": usage_dict()}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        if not worker.ready.is_set():
            status = "error" if worker.load_error else "loading"
            return JSONResponse({"status": status, "error": worker.load_error}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "tinygrad_llm"}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request):
        check_key(request)
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                           f"{name!r}", param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "tinygrad_llm"}

    @app.get("/v1/info")
    async def info(request: Request):
        """What the chat page shows: the model's name, context, template and batch size."""
        check_key(request)
        require_ready()
        template = state["template"].name if state["template"] else None
        return {"model": name, "context_length": worker.context_length, "template": template,
                "max_batch": max_batch}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_json(request)
        require_ready()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' should be a string (one prompt per request)",
                           param="prompt", code="invalid_type" if prompt else "missing")
        options = sampling_options(body, worker.context_length, 16, max_batch)
        shape = {
            "prefix": "cmpl", "object": "text_completion", "chunk_object": "text_completion",
            "choice": lambda i, text, reason: {"index": i, "text": text, "logprobs": None,
                                               "finish_reason": reason},
        }
        shape["delta"] = shape["choice"]
        return await generate(request, encode_prompt(prompt), options, tuple(options["stop"]),
                              shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        require_ready()
        messages = check_messages(body)
        template = state["template"]
        prompt = template.prompt(messages) if template else plain_prompt(messages)
        prompt_ids = encode_prompt(prompt)
        options = sampling_options(body, worker.context_length,
                                   worker.context_length - len(prompt_ids), max_batch)
        stop = tuple(options["stop"]) + (template.stop if template else ())

        def choice(i, text, reason):
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": reason}

        def delta(i, text, reason):
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": reason}

        shape = {"prefix": "chatcmpl", "object": "chat.completion",
                 "chunk_object": "chat.completion.chunk", "choice": choice, "delta": delta,
                 "first": lambda i: {"index": i, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}}
        return await generate(request, prompt_ids, options, stop, shape)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))

    return app


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", timeout: float = 60.0):
    """Run ``app`` with uvicorn in a thread on a free port; yields its base URL (for tests,
    benchmarks and notebooks). Returns once /health answers 200; stops the server on exit."""
    import socket
    import threading
    import urllib.request

    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))  # port 0: the system picks a free one, and we hold it
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError(f"the server at {url} did not become healthy: "
                                       f"{app.state.worker.load_error or 'timed out'}") from None
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
