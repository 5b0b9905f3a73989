"""Serve a model over OpenAI's HTTP API, with a chat page at /.

    tinygrad-llm serve --checkpoint sft                       http://127.0.0.1:8000/
    tinygrad-llm serve --checkpoint sft --model-name sft --api-key secret --port 9000

Endpoints: GET /health (200 once the model is loaded, 503 before), GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true). Chat messages
are rendered in the checkpoint's own template (plain lines for a base model). Any OpenAI client
works: base_url="http://127.0.0.1:8000/v1". Concurrent requests are decoded together, one
forward pass per step (--max-batch sequences); more wait in a queue (--queue-size), beyond which
the server answers 429. It listens on localhost only unless --host says otherwise.
Needs the serve extra: pip install 'tinygrad_llm[serve]'. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from tinygrad_llm.train.options import UserError, add_device_arguments, non_empty, positive_int


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected a port 1..65535")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model to serve: a checkpoint or run folder of this project, or a "
                             "Hugging Face GPT-2 folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port")
    parser.add_argument("--model-name", type=non_empty, default=None,
                        help="the model's name in the API (default: the checkpoint folder's name)")
    parser.add_argument("--api-key", type=non_empty, default=None,
                        help="require 'Authorization: Bearer KEY' on every /v1 request")
    add_device_arguments(parser)
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="sequences decoded together in one forward pass (KV cache slots)")
    parser.add_argument("--queue-size", type=positive_int, default=64,
                        help="requests that may wait for a slot; more are refused with 429")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1_000_000,
                        help="largest request body accepted (larger: 413)")


def run(args) -> int:
    try:
        import uvicorn

        from tinygrad_llm.serve import create_app
    except ImportError as error:
        raise UserError(f"serve needs FastAPI and uvicorn ({error.name} is missing): "
                        "pip install 'tinygrad_llm[serve]'") from None
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint}: no such folder")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: expected cpu or cuda")
    with socket.socket() as probe:  # a clear message now, not a uvicorn log line later
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror}; "
                            "choose another --port (or --host)") from None
    app = create_app(args.checkpoint, device=args.device, model_name=args.model_name,
                     api_key=args.api_key, max_batch=args.max_batch, queue_size=args.queue_size,
                     max_body_bytes=args.max_body_bytes)
    name = app.state.model_name
    print(f"serving {name!r} on http://{args.host}:{args.port}/ (chat page), "
          f"API at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    from tinygrad_llm.train.cli import run_standalone

    raise SystemExit(run_standalone(sys.modules[__name__]))
