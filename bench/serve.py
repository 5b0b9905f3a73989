"""Throughput of the HTTP server: 1 and 8 concurrent streaming clients, time to first token.

    python bench/serve.py                            # a tiny random GPT (4 layers, 128 wide)
    python bench/serve.py --checkpoint /tmp/work/sft --tokens 64

Starts the server itself (uvicorn in a thread, a free localhost port), then for each client
count sends that many streaming chat requests at once (greedy, at most ``--tokens`` tokens each;
a finetuned model may stop earlier) and prints, per count: ``clients=N tokens_per_s=<all
clients' tokens / wall time> ttft_ms=<mean time to the first streamed text>
tokens_per_request=<mean>``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tinygrad_llm import backend
from tinygrad_llm.models.gpt import GPT, GPTConfig
from tinygrad_llm.serve import create_app, running_server


def tiny_checkpoint(folder: Path) -> Path:
    """A random GPT with GPT-2's tokenizer, small enough that HTTP overhead shows."""
    from tinygrad_llm.loading import save_model
    from tinygrad_llm.tokenizer import GPT2Tokenizer

    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=256, n_layer=4, n_head=4,
                          n_embd=128, tie_weights=True))
    save_model(folder / "tiny", model, GPT2Tokenizer())
    return folder / "tiny"


def one_client(url: str, tokens: int, results: list) -> None:
    """One streaming chat request; appends (time to first text, completion tokens)."""
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, used = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    results.append((first if first is not None else float("nan"), used))


def measure(url: str, clients: int, tokens: int) -> tuple[float, float, float]:
    """(tokens per second over all clients, mean time to first token in ms, mean tokens)."""
    results: list = []
    threads = [threading.Thread(target=one_client, args=(url, tokens, results))
               for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    total = sum(used for _, used in results)
    return (total / wall, 1000 * sum(first for first, _ in results) / len(results),
            total / len(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: a tiny random GPT")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    backend.tune_cpu_allocator()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(folder))
        app = create_app(checkpoint, device=args.device, max_batch=max(args.clients))
        with running_server(app) as url:
            one_client(url, 4, [])  # warm up
            for clients in args.clients:
                rate, ttft, used = measure(url, clients, args.tokens)
                print(f"clients={clients} tokens_per_s={rate:.1f} ttft_ms={ttft:.1f} "
                      f"tokens_per_request={used:.1f}", flush=True)


if __name__ == "__main__":
    main()
