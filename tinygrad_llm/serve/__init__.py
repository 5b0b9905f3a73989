"""An OpenAI-compatible HTTP server for this project's models, with a chat page.

    create_app(checkpoint=DIR)   a FastAPI app: /health, /v1/models, /v1/completions,
                                 /v1/chat/completions and the chat page at /
    Worker                       the thread that owns the model and batches requests

FastAPI and uvicorn are the optional ``serve`` extra: ``pip install 'tinygrad_llm[serve]'``.
See docs/serving.md.
"""

from .worker import QueueFull, Request, SlotCache, Worker

__all__ = ["QueueFull", "Request", "SlotCache", "Worker", "create_app", "running_server"]


def create_app(*args, **kwargs):
    """The FastAPI app (imported on use, so the worker needs no web framework)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


def running_server(*args, **kwargs):
    """uvicorn in a thread on a free port: ``with running_server(app) as url: ...``."""
    from .app import running_server as _running_server
    return _running_server(*args, **kwargs)
