"""Gives the heap memory that large requests freed back to the system once a burst of them is over.

glibc's malloc raises its mmap threshold to the size of every mmapped chunk that is freed (up to 32 MB), so
after the first large request the request bodies, base64 strings and decoded images (1-16 MB each) come from
its arenas, one per allocating thread, and a freed chunk inside an arena stays in the process: rounds of eight
12 MB requests took the server from 0.76 to 2.0 GB without batching (docs/soak.md). `malloc_trim(0)` hands the
free pages back. It walks every arena, so it runs on its own thread once no large request has ended for a
while (a burst is over), not after each request; and under traffic that never pauses, at most every
LOAD_SECONDS once requests holding LARGE_REQUEST_BYTES in all have ended since the last trim (a fuzzing run
without batching grew about 10 MB a minute with no pause to trim in). Elsewhere than glibc the trimmer does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

LARGE_REQUEST_BYTES = 1 << 20  # requests whose inputs hold at least this much are what fills the arenas
QUIET_SECONDS = 1.0  # a burst is over when no large request has ended for this long
LOAD_SECONDS = 30.0  # under traffic that never pauses, the longest time between two trims


def input_bytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Bytes a request's input arrays hold (the strings' lengths for arrays of encoded images)."""
    total = 0
    for array in inputs.values():
        if array.dtype == object:
            total += sum(len(item) for item in array.flat if isinstance(item, bytes))
        else:
            total += array.nbytes
    return total


M_ARENA_MAX = -8  # glibc's mallopt parameter: the most malloc arenas the process may have
DEFAULT_ARENAS = 2  # measured: docs/fuzzing.md (the glibc default is 8 a CPU)


def limit_arenas(count: int) -> bool:
    """Caps glibc's malloc arenas (mallopt M_ARENA_MAX), as MALLOC_ARENA_MAX does; True if done. glibc gives each
    thread that allocates an arena of its own, up to 8 a CPU, and the free memory each arena keeps between the
    chunks still in use is memory the process holds: under a fuzzing run without batching, 400-440 MB free in 20
    minutes with the default, 64 MB with 2 arenas. Call it before the server's threads start; arenas already
    made stay. 0 or a C library without mallopt (musl, macOS): nothing changes."""
    if count <= 0:
        return False
    mallopt = _libc("mallopt")
    return bool(mallopt and mallopt(M_ARENA_MAX, count))


def _libc(function: str):
    """A glibc function, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


class Trimmer:
    def __init__(self, large_bytes: int = LARGE_REQUEST_BYTES, quiet_seconds: float = QUIET_SECONDS,
                 load_seconds: float = LOAD_SECONDS) -> None:
        self.large_bytes, self.quiet_seconds, self.load_seconds = large_bytes, quiet_seconds, load_seconds
        self.trims = 0  # times the heap was given back so far
        self.under_load = 0  # of them, while requests kept ending
        self.seconds = 0.0  # spent in malloc_trim, all trims
        self.longest = 0.0
        self._trim = _libc("malloc_trim")
        self._last_large: float | None = None  # when the last large request ended, until trimmed
        self._pending = 0  # input bytes of the requests that ended since the last trim
        self._last_trim = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def note(self, nbytes: int) -> None:
        """A request whose inputs held `nbytes` has ended."""
        self._pending += nbytes  # an unlocked sum: a lost update costs one trim's timing, nothing else
        if nbytes >= self.large_bytes:
            self._last_large = time.monotonic()

    def start(self) -> Trimmer:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(min(self.quiet_seconds, 0.25)):
            now, last = time.monotonic(), self._last_large
            if last is not None and now - last >= self.quiet_seconds:  # a burst is over
                self._give_back(now)
            elif now - self._last_trim >= self.load_seconds and self._pending >= self.large_bytes:
                self.under_load += 1  # no pause comes: what ended since the last trim is given back now
                self._give_back(now)

    def _give_back(self, now: float) -> None:
        self._last_large, self._pending = None, 0
        self._trim(0)
        self._last_trim = time.monotonic()
        spent = self._last_trim - now
        self.trims += 1
        self.seconds += spent
        self.longest = max(self.longest, spent)

    def summary(self) -> str:
        return (f"heap given back {self.trims} time(s) ({self.under_load} under load), "
                f"{self.seconds * 1000:.0f} ms in all, longest {self.longest * 1000:.1f} ms")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
