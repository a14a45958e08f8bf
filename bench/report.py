"""What the benchmark scripts share and that needs no TensorFlow (bench.multi_worker's driver process stays
light): their progress lines, their results as JSON, and free loopback ports for the processes they start."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def emit(results: dict[str, Any], out: str | Path | None) -> None:
    """The results on stdout as JSON, and in `out` too when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now: bound at once by the OS (so they differ), then released for others to take."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
