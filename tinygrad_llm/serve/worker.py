"""The model worker: one thread owns the model and decodes every request in one batch.

    HTTP handlers --submit(Request)--> bounded queue --> worker thread
    worker thread: admit waiting sequences into free slots (prefill each alone, first token),
                   then one forward pass of ONE new token for every active slot, sample per row,
                   send each sequence's new text back to its handler (thread-safe callback)

Continuous batching with a slot cache: every layer keeps one key/value buffer of
(max_batch, H, context_length, D), allocated once. Each active sequence owns a row ("slot") and
its own length: its keys sit at columns 0..length-1 of its row, the rest of the row is masked out
as padding. A decoding step writes each row's new key at that row's own length, so sequences of
any lengths share one forward pass without copying or re-prefilling. Sequences join between
steps; a finished one frees its slot by moving the last active row into it (one row copy), so the
active rows are always 0..n-1 and each step reads a view of the buffers.

Each sequence has its own random generator (seeded from the request's ``seed``), so a sequence
gets the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from ..generate import cut_at_stop, safe_prefix_length, sample_next
from ..tensor import no_grad


class QueueFull(Exception):
    """The worker's queue is full: the caller should retry later (HTTP 429)."""


# ------------------------------------------------------------------------- slot cache
class SlotCache:
    """One layer's keys and values for ``slots`` sequences, each row at its own length.

    It has the interface GPT's attention expects of a KVCache (``length`` and ``append``); the
    forward pass covers the rows in ``self.rows`` (a slice, so reads are views).
    """

    def __init__(self, slots: int, n_head: int, context_length: int, head_dim: int, xp, dtype):
        # zeros, unlike KVCache's empty buffers: a shorter row's columns beyond its length are
        # read (masked out), and a NaN left there would turn even a zero weight into NaN
        self.k = xp.zeros((slots, n_head, context_length, head_dim), dtype=dtype)
        self.v = xp.zeros_like(self.k)
        self.lengths = np.zeros(slots, dtype=np.int64)  # positions filled, per row
        self.rows = slice(0, 0)

    @property
    def length(self) -> int:
        """Key columns before this forward: the longest row (shorter rows are padded)."""
        return int(self.lengths[self.rows].max())

    def append(self, k, v) -> tuple:
        """Write k, v (B, H, T, D) after each row's own keys; return keys, values (B, H, Tk, D)."""
        T = k.shape[2]
        keys = self.length + T
        for i, row in enumerate(range(self.rows.start, self.rows.stop)):
            start = self.lengths[row]
            self.k[row, :, start:start + T] = k[i]
            self.v[row, :, start:start + T] = v[i]
            self.lengths[row] = start + T
        return self.k[self.rows, :, :keys], self.v[self.rows, :, :keys]

    def move(self, source: int, target: int) -> None:
        """Copy row ``source`` into row ``target`` (frees ``source``)."""
        self.k[target] = self.k[source]
        self.v[target] = self.v[source]
        self.lengths[target] = self.lengths[source]


# ------------------------------------------------------------------- requests, sequences
@dataclass
class Request:
    """One HTTP request: ``n`` sequences from one prompt, and where their events go.

    ``emit(event)`` is called from the worker thread with ("text", index, piece) and
    ("done", index, finish_reason, completion_tokens) events (or ("error", message)).
    """

    prompt_ids: list
    max_tokens: int
    emit: Callable
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple = ()
    seed: int | None = None
    n: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Sequence:
    """One choice being generated: its slot, its tokens, how much of its text was sent."""

    request: Request
    index: int
    rng: np.random.Generator
    row: int = -1
    next_id: int = 0  # the sampled token not yet fed to the model
    length: int = 0  # tokens in the cache
    generated: list = field(default_factory=list)
    shown: int = 0  # characters of text already sent


# --------------------------------------------------------------------------------- worker
class Worker:
    """Owns the model; a thread that batches all requests (see the module docstring).

    Args:
        load: returns (model, tokenizer); called in the worker thread, so the server can
            answer /health (503) while a large model loads.
        max_batch: sequences decoded together (slots in the KV cache).
        queue_size: requests waiting for a slot before new ones are refused (429).
    """

    def __init__(self, load: Callable, max_batch: int = 8, queue_size: int = 64):
        self.load, self.max_batch = load, max_batch
        self.pending: queue.Queue = queue.Queue(maxsize=queue_size)
        self.waiting: deque = deque()  # taken from the queue, not yet in a slot
        self.active: list[Sequence] = []  # active[i].row == i
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.stopping = threading.Event()
        self.model = self.tokenizer = self.caches = None
        self.thread = threading.Thread(target=self._main, name="model-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when the queue is full."""
        try:
            self.pending.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self.pending.maxsize} requests are already "
                            "waiting; retry in a moment") from None

    # ---------------------------------------------------------------- the thread
    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self.load()
            self.model.eval()
            config, device = self.model.config, self.model.device
            xp = backend.array_module(device)
            self.caches = [SlotCache(self.max_batch, config.n_head, config.context_length,
                                     config.n_embd // config.n_head, xp,
                                     self.model.wte.weight.dtype)
                           for _ in range(config.n_layer)]
        except Exception as error:  # reported by /health and every request
            self.load_error = f"the model could not be loaded: {error}"
            return
        self.ready.set()
        with no_grad():
            while not self.stopping.is_set():
                try:
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as error:  # never let one bad batch stop the server
                    for sequence in list(self.active):
                        sequence.request.emit(("error", f"generation failed: {error}"))
                        self._finish(sequence, None)

    def _admit(self) -> None:
        """Move waiting requests into free slots, prefilling each new sequence."""
        block = not self.active and not self.waiting
        try:  # wait for work only when there is nothing to decode
            while True:
                self.waiting.append(self.pending.get(block=block, timeout=0.05))
                block = False
        except queue.Empty:
            pass
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                continue
            if len(self.active) + request.n > self.max_batch:
                return  # the oldest request waits for enough free slots (first come, first served)
            self.waiting.popleft()
            for index in range(request.n):
                seed = None if request.seed is None else [request.seed, index]
                self._prefill(Sequence(request, index, np.random.default_rng(seed)))

    def _forward(self, rows: slice, ids, positions=None, padding_mask=None) -> np.ndarray:
        """Run the model over ``rows`` of the slot cache; logits of the last position (B, V)."""
        for cache in self.caches:
            cache.rows = rows
        logits = self.model(ids, self.caches, positions, padding_mask, last_only=True)
        return backend.to_numpy(logits.data[:, -1, :])

    def _prefill(self, sequence: Sequence) -> None:
        """Give ``sequence`` a slot, run its prompt, sample its first token."""
        sequence.row = row = len(self.active)
        self.active.append(sequence)
        for cache in self.caches:
            cache.lengths[row] = 0
        ids = np.asarray([sequence.request.prompt_ids], dtype=np.int64)  # (1, T)
        logits = self._forward(slice(row, row + 1), ids)
        sequence.length = ids.shape[1]
        self._accept(sequence, logits[0])

    def _step(self) -> None:
        """One new token for every active sequence, in one forward pass."""
        n = len(self.active)
        lengths = np.array([s.length for s in self.active])
        ids = np.array([[s.next_id] for s in self.active], dtype=np.int64)  # (n, 1)
        keys = lengths.max() + 1
        mask = np.arange(keys)[None, :] <= lengths[:, None]  # (n, keys): a row's own columns
        logits = self._forward(slice(0, n), ids, lengths[:, None], mask)  # (n, V)
        for sequence, row_logits in zip(list(self.active), logits, strict=True):
            sequence.length += 1
            self._accept(sequence, row_logits)

    def _accept(self, sequence: Sequence, logits: np.ndarray) -> None:
        """Sample the next token from ``logits`` (V,), send new text, finish when it is time."""
        request = sequence.request
        if request.cancelled.is_set():
            return self._finish(sequence, None)
        token = int(sample_next(logits[None], sequence.rng, request.temperature, request.top_k,
                                request.top_p)[0])
        if token == self.tokenizer.eot_token:
            return self._finish(sequence, "stop")
        sequence.generated.append(token)
        text, stopped = cut_at_stop(self.tokenizer.decode(sequence.generated), request.stop)
        if stopped:
            return self._finish(sequence, "stop", text)
        end = safe_prefix_length(text, request.stop)
        if end > sequence.shown:
            request.emit(("text", sequence.index, text[sequence.shown:end]))
            sequence.shown = end
        if len(sequence.generated) >= request.max_tokens:
            return self._finish(sequence, "length", text)
        if sequence.length >= self.context_length:  # the window is full
            return self._finish(sequence, "length", text)
        sequence.next_id = token

    def _finish(self, sequence: Sequence, reason: str | None, text: str | None = None) -> None:
        """Send the rest of the text and the finish reason; free the slot."""
        if reason is not None:
            if text is None:
                text, _ = cut_at_stop(self.tokenizer.decode(sequence.generated),
                                      sequence.request.stop)
            if len(text) > sequence.shown:
                sequence.request.emit(("text", sequence.index, text[sequence.shown:]))
            sequence.request.emit(("done", sequence.index, reason, len(sequence.generated)))
        last = self.active.pop()  # keep the active rows 0..n-1: the last row fills the gap
        if last is not sequence:
            for cache in self.caches:
                cache.move(last.row, sequence.row)
            last.row = sequence.row
            self.active[sequence.row] = last


def wait_until_ready(worker: Worker, timeout: float = 60.0) -> None:
    """Block until the worker's model is loaded (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while not worker.ready.wait(0.05):
        if worker.load_error or time.monotonic() > deadline:
            raise RuntimeError(worker.load_error or "the model did not load in time")
