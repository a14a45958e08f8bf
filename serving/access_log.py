"""The access log (`--access_log_file`, off by default): one JSON object a line for each Predict, metadata and
status request, over gRPC and REST alike. Not in tensorflow_model_server.

    {"time": "2025-01-01T12:00:00.123+00:00", "model": "mnist", "version": 1, "api": "grpc", "method": "Predict",
     "status": "OK", "latency_ms": 2.113, "batch_size": 1, "client": "ipv4:127.0.0.1:52814"}

- time: when the request arrived, UTC, ISO 8601; latency_ms: until its answer was ready (REST: sent).
- version: the version that answered (or refused the request once it had it), null when none did.
- api "grpc" or "rest"; method the gRPC method's name for both (Predict, GetModelMetadata, GetModelStatus, ...).
- status: the gRPC code's name, or the HTTP status (499: the client left before the answer, as TF Serving's
  REST maps CANCELLED).
- batch_size: the images in the request, null when not known (the request was refused before its inputs were
  checked, or it has none).
- client: the peer as gRPC writes it (`ipv4:127.0.0.1:52814`, `ipv6:[::1]:52814`), for REST too.

Never the request's body, its images or its headers. The model name is the client's: json.dumps escapes it
(a name cannot start a line of its own) and it is cut to MAX_MESSAGE_CHARS, like the other echoes. Lines go
through a queue to a thread that writes them, so a slow disk or a stalled stdout never holds a request; once
MAX_QUEUED lines wait, further lines are dropped and counted (a warning at stop says how many).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener

from serving.errors import MAX_MESSAGE_CHARS

log = logging.getLogger("serving")

MAX_QUEUED = 10_000
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left first; TF Serving's REST for CANCELLED


@dataclass
class Call:
    """One request's line, filled in as it is served."""

    api: str
    method: str
    client: str
    model: str | None = None
    version: int | None = None
    batch_size: int | None = None
    arrived: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    token: Token | None = field(default=None, repr=False)


# The request the current asyncio task (gRPC) or thread (REST) serves: the front ends open it, the Predictor
# notes into it the version that answered and the batch size, which only it knows (gRPC's servicer methods take
# a request and a context, nothing else).
_current: ContextVar[Call | None] = ContextVar("access_log_call", default=None)


def note(version: int | None = None, batch_size: int | None = None) -> None:
    """Records, on the request being served (if it is logged), the version that answered and its batch size."""
    call = _current.get()
    if call is None:
        return
    if version is not None:
        call.version = version
    if batch_size is not None:
        call.batch_size = batch_size


def peer(address: tuple) -> str:
    """A socket address as gRPC's context.peer() writes it."""
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _bounded(name: str) -> str:
    if len(name) > MAX_MESSAGE_CHARS:
        return f"{name[:MAX_MESSAGE_CHARS]}... ({len(name)} characters in all)"
    return name


class _DroppingQueueHandler(QueueHandler):
    """Never waits for room: a line that finds the queue full is counted and dropped."""

    def __init__(self, lines: queue.Queue) -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # at stop, into a full queue too: waits for the thread to make room


class AccessLog:
    """Where the lines go: a file (appended to), "-" for stdout, "" for nowhere (then begin() returns None and
    nothing else costs anything)."""

    def __init__(self, destination: str = "") -> None:
        self._listener: QueueListener | None = None
        if not destination:
            return
        self._writer = logging.StreamHandler(sys.stdout) if destination == "-" else logging.FileHandler(
            destination, encoding="utf-8")  # opened now: a path that cannot be written stops the server at start
        self._writer.setFormatter(logging.Formatter("%(message)s"))
        self._queue_handler = _DroppingQueueHandler(queue.Queue(MAX_QUEUED))
        self._logger = logging.Logger("serving.access_log", logging.INFO)  # not registered: one per server
        self._logger.propagate = False
        self._logger.addHandler(self._queue_handler)
        self._listener = _Writer(self._queue_handler.queue, self._writer)
        self._listener.start()

    @property
    def enabled(self) -> bool:
        return self._listener is not None

    def begin(self, api: str, method: str, client: str, model: str | None = None) -> Call | None:
        """The record of a request that has just arrived, current until end(); None when the log is off."""
        if not self.enabled:
            return None
        call = Call(api, method, client, model)
        call.token = _current.set(call)
        return call

    def end(self, call: Call | None, status: str | int) -> None:
        """Writes the request's line (queued); the record is no longer current."""
        if call is None:
            return
        latency_ms = (time.monotonic() - call.started) * 1000
        if call.token is not None:
            try:
                _current.reset(call.token)
            except ValueError:  # ended in another context than it began in: it simply stops being current there
                pass
            call.token = None
        line = {
            "time": datetime.fromtimestamp(call.arrived, UTC).isoformat(timespec="milliseconds"),
            "model": None if call.model is None else _bounded(call.model),
            "version": call.version, "api": call.api, "method": call.method, "status": status,
            "latency_ms": round(latency_ms, 3), "batch_size": call.batch_size, "client": call.client,
        }
        self._logger.info(json.dumps(line))

    def close(self) -> None:
        """Writes what is queued and stops the writer thread."""
        if self._listener is None:
            return
        self._listener.stop()
        self._listener = None
        self._writer.close()  # the file; stdout stays open
        if self._queue_handler.dropped:
            log.warning("Access log: %d lines dropped (the writer fell %d lines behind)",
                        self._queue_handler.dropped, MAX_QUEUED)
