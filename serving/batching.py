"""Server-side batching: concurrent Predict calls on the same servable and signature become one call.

Like TF Serving's BatchingSession: a request waits at most `batch_timeout_micros` for company, a batch
holds at most `max_batch_size` rows, `num_batch_threads` batches run at once, and a queue holding more
than `max_enqueued_batches` batches rejects new work with UNAVAILABLE. If the merged call fails with
INVALID_ARGUMENT (one bad image), the requests are rerun one by one so only the bad one fails.

With a batch_timeout_micros of at most INLINE_MAX_TIMEOUT_MICROS, a request that finds a batch slot free
does not wait for company: waiting that long would cost about what a hand-off costs. Requests that arrive
while every slot is busy queue up and leave as one batch when a slot frees: the batch size follows the load.

Two entry points. `run` blocks the calling thread (the REST front end's threads); `run_async` is awaited on
an asyncio loop (the gRPC front end). Both go through the queue, and the model runs only on the batch
threads: never on the loop, which must stay free to read the requests that gRPC hands it one at a time, and
never on a REST connection's thread, which lives for one connection (TensorFlow keeps state for every thread
that runs a function and does not free it when the thread ends: about 0.4 MB of RSS a thousand threads).
A batch's answers reach a loop in one `call_soon_threadsafe`, not one thread wake-up per request.
"""

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving.errors import ServingError
from serving.models import Servable

log = logging.getLogger(__name__)

INLINE_MAX_TIMEOUT_MICROS = 100


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Refuses parameters that cannot work, every problem at once with the value given: TF Serving's rule
        for allowed_batch_sizes (strictly increasing, the last one max_batch_size), counts of at least 1."""
        problems = [f"{name} must be at least 1, not {getattr(self, name)}"
                    for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches")
                    if getattr(self, name) < 1]
        if self.batch_timeout_micros < 0:
            problems.append(f"batch_timeout_micros must not be negative, not {self.batch_timeout_micros}")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes))):
            problems.append(f"allowed_batch_sizes must be positive and strictly increasing, not {sizes}")
        if sizes and sizes[-1] != self.max_batch_size:
            problems.append(f"the last of allowed_batch_sizes {sizes} must equal max_batch_size "
                            f"({self.max_batch_size})")
        if problems:
            raise ValueError(f"Batching parameters: {'; '.join(problems)}")

    @classmethod
    def from_proto(cls, params) -> "BatchingOptions":
        """From a BatchingParameters message; unset fields keep the defaults above."""
        def get(name: str, default: int) -> int:
            return getattr(params, name).value if params.HasField(name) else default
        return cls(get("max_batch_size", cls.max_batch_size), get("batch_timeout_micros", cls.batch_timeout_micros),
                   get("num_batch_threads", cls.num_batch_threads),
                   get("max_enqueued_batches", cls.max_enqueued_batches), tuple(params.allowed_batch_sizes))

    @property
    def runs_at_once(self) -> bool:
        """A timeout this short (at most INLINE_MAX_TIMEOUT_MICROS) means: do not wait for company at all; a
        free batch slot takes what is queued at once, a lone request included (see the module docstring)."""
        return self.batch_timeout_micros <= INLINE_MAX_TIMEOUT_MICROS

    @property
    def wait_seconds(self) -> float:
        """How long the oldest queued request waits for company."""
        return 0.0 if self.runs_at_once else self.batch_timeout_micros / 1e6


@dataclass
class _Task:
    servable: Servable
    signature_name: str
    inputs: dict[str, np.ndarray]
    size: int
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event | None = None  # run(): set when finished
    future: asyncio.Future | None = None  # run_async(): resolved on its loop when finished
    outputs: dict[str, np.ndarray] | None = None
    error: ServingError | None = None

    def resolve(self) -> None:
        """On the future's loop: hand the outputs or the error to the awaiting coroutine."""
        if self.future.done():  # cancelled: the client went away
            return
        if self.error:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.outputs)


class Batcher:
    def __init__(self, options: BatchingOptions, on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.options = options
        self._on_batch = on_batch
        self._queues: dict[tuple, list[_Task]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # batches being processed on the batch threads: at most num_batch_threads
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def _check_size(self, size: int) -> None:
        """A request larger than the whole queue could never be queued: retrying, what UNAVAILABLE asks a
        client to do, cannot help, so it is refused as TF Serving refuses a task over its batch limit."""
        limit = self.options.max_enqueued_batches * self.options.max_batch_size
        if size > limit:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Task size {size} is larger than the batch queue can hold ({limit} = "
                               f"max_enqueued_batches x max_batch_size): send fewer images per request")

    def run(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
            size: int) -> dict[str, np.ndarray]:
        self._check_size(size)
        task = _Task(servable, signature_name, inputs, size)
        task.done = threading.Event()
        self._enqueue(task)
        task.done.wait()
        error, outputs = task.error, task.outputs
        del task  # raised from here, the error's traceback holds this frame: it must not hold the task
        if error:
            raise error.detached()
        return outputs

    async def run_async(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
                        size: int) -> dict[str, np.ndarray]:
        self._check_size(size)
        task = _Task(servable, signature_name, inputs, size)
        task.future = future = asyncio.get_running_loop().create_future()
        self._enqueue(task)
        del task  # as in run(): the error raised here must not lead back to the task through this frame
        try:
            return await future
        finally:
            del future

    def queued(self) -> int:
        """Requests waiting for a batch slot."""
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    def _enqueue(self, task: _Task) -> None:
        with self._cond:
            queue = self._queues.setdefault((id(task.servable), task.signature_name), [])
            limit = self.options.max_enqueued_batches * self.options.max_batch_size
            if sum(t.size for t in queue) + task.size > limit:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            queue.append(task)
            self._cond.notify()

    def _next_batch(self) -> list[_Task] | None:
        """Under the lock: wait until some queue is full or its oldest task has waited long enough."""
        timeout = self.options.wait_seconds
        while True:
            now, wake = time.monotonic(), None
            if self._running >= self.options.num_batch_threads and not self._stopping:
                self._cond.wait()
                continue
            for key, queue in self._queues.items():
                deadline = queue[0].enqueued + timeout
                if sum(t.size for t in queue) >= self.options.max_batch_size or deadline <= now or self._stopping:
                    batch, total = [], 0
                    while queue and (not batch or total + queue[0].size <= self.options.max_batch_size):
                        total += queue[0].size
                        batch.append(queue.pop(0))
                    if not queue:
                        del self._queues[key]
                    self._running += 1
                    return batch
                wake = deadline if wake is None else min(wake, deadline)
            if self._stopping:
                return None
            self._cond.wait(None if wake is None else wake - now)

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            try:
                self._process(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify()
                self._finish(batch)
                del batch  # not kept while waiting for the next one: its tasks hold their requests

    @staticmethod
    def _finish(batch: list[_Task]) -> None:
        """Wakes the waiting threads, and each event loop once with all of its tasks."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Task]] = {}
        for task in batch:
            if task.outputs is None and task.error is None:
                task.error = ServingError(grpc.StatusCode.INTERNAL, "batch processing failed")
            if task.future is not None:
                by_loop.setdefault(task.future.get_loop(), []).append(task)
            else:
                task.done.set()
        for loop, tasks in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, tasks)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                log.debug("event loop closed before %d answers were delivered", len(tasks))

    def _process(self, batch: list[_Task]) -> None:
        total = sum(t.size for t in batch)
        self._on_batch(total)
        if len(batch) == 1:
            return self._run_alone(batch[0])
        first = batch[0]
        try:
            merged = {name: np.concatenate([t.inputs[name] for t in batch]) for name in first.inputs}
        except ValueError:  # trailing dims differ: cannot stack
            return self._run_each(batch)
        padded = self._padded_size(total)
        if padded > total:
            merged = {name: np.concatenate([value, np.repeat(value[:1], padded - total, axis=0)])
                      for name, value in merged.items()}
        try:
            outputs = first.servable.run(first.signature_name, merged)
        except ServingError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                return self._run_each(batch)
            for task in batch:
                task.error = e.detached()
            return
        if any(value.ndim == 0 or value.shape[0] != padded for value in outputs.values()):
            return self._run_each(batch)  # outputs not batch-major: merging was not safe
        start = 0
        for task in batch:
            task.outputs = {name: value[start:start + task.size] for name, value in outputs.items()}
            start += task.size

    def _padded_size(self, total: int) -> int:
        sizes = self.options.allowed_batch_sizes
        i = bisect.bisect_left(sizes, total)
        return sizes[i] if i < len(sizes) else total

    def _run_each(self, batch: list[_Task]) -> None:
        for task in batch:
            self._run_alone(task)

    @staticmethod
    def _run_alone(task: _Task) -> None:
        try:
            task.outputs = task.servable.run(task.signature_name, task.inputs)
        except ServingError as e:  # kept on the task: detached, or its traceback would lead back to the task
            task.error = e.detached()

    def stop(self) -> None:
        """Finish what is queued, then end the worker threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)


def _resolve_all(tasks: list[_Task]) -> None:
    for task in tasks:
        task.resolve()
