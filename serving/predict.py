"""Predict, shared by the gRPC and REST front ends: find the servable, check the inputs, run, filter.

`predict` blocks the calling thread (REST); `predict_async` is the same on an asyncio loop (gRPC): with
batching it awaits the batcher, without it the signature runs on a thread pool so the loop keeps serving.
Each request is counted in the metrics (serving/metrics.py) under the version that answered it, and that version
and the request's batch size are noted for its access-log line (serving/access_log.py).
"""

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from serving.access_log import AccessLog, note
from serving.batching import Batcher
from serving.errors import ServingError
from serving.limits import RequestLimits
from serving.memory import Trimmer, input_bytes
from serving.metrics import Metrics
from serving.models import DEFAULT_SIGNATURE, ModelManager, Servable

PREDICT = "Predict"  # the API label of the metrics and the method of the access log, as TF Serving names it


@dataclass
class PredictResult:
    model_name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


class Predictor:
    def __init__(self, manager: ModelManager, batcher: Batcher | None, metrics: Metrics,
                 executor: Executor | None = None, limits: RequestLimits | None = None,
                 trimmer: Trimmer | None = None, access_log: AccessLog | None = None) -> None:
        self.manager, self.batcher, self.metrics = manager, batcher, metrics
        self.access_log = access_log or AccessLog()  # the front ends write it; off unless given one
        self.trimmer = trimmer  # told each request's size: gives the heap back after bursts of large ones
        self.limits = limits or RequestLimits()  # images a request may hold (serving/limits.py; pixels: the graph)
        self.executor = executor  # where a call the batcher does not take runs

    @contextmanager
    def _serving(self, model_name: str, version: int | None, label: str | None, api: str,
                 method: str) -> Iterator[Servable]:
        """The servable for one request, held while it runs; the request's status and latency recorded under the
        version that answered (none if the request failed before one was found)."""
        started = time.monotonic()
        status = "OK"
        served = None
        try:
            with self.manager.acquire(model_name, version, label) as servable:
                served = servable.version
                note(version=served)
                yield servable
        except ServingError as e:
            status = e.code.name
            raise
        except asyncio.CancelledError:  # the gRPC client left (or its deadline passed) before the answer
            status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception:  # a bug of ours: gRPC answers UNKNOWN, REST 500
            status = grpc.StatusCode.UNKNOWN.name
            raise
        finally:
            self.metrics.record_request(model_name, served, api, method, status, time.monotonic() - started)

    def predict(self, model_name: str, version: int | None, label: str | None, signature_name: str,
                get_inputs: Callable[[Servable, str], dict[str, np.ndarray]], output_filter: list[str] | None = None,
                api: str = "grpc", method: str = PREDICT) -> PredictResult:
        """get_inputs(servable, signature_name) builds the input arrays once the servable is known (it may also
        check the signature, as Classify does). `method` names the call in the metrics: Predict, Classify."""
        signature_name = signature_name or DEFAULT_SIGNATURE
        with self._serving(model_name, version, label, api, method) as servable:
            inputs = get_inputs(servable, signature_name)
            try:
                batch_size = self._check(servable, signature_name, inputs, output_filter)
                started = time.monotonic()
                if self.batcher and batch_size:
                    outputs = self.batcher.run(servable, signature_name, inputs, batch_size)
                elif self.executor:  # not on the caller's thread: see serving/batching.py on REST threads
                    outputs = self.executor.submit(servable.run, signature_name, inputs).result()
                else:
                    outputs = servable.run(signature_name, inputs)
                self.metrics.record_runtime(servable.name, servable.version, method, time.monotonic() - started)
                return self._result(servable, signature_name, outputs, output_filter)
            finally:
                self._ended(inputs)

    async def predict_async(self, model_name: str, version: int | None, label: str | None, signature_name: str,
                            get_inputs: Callable[[Servable, str], dict[str, np.ndarray]],
                            output_filter: list[str] | None = None, api: str = "grpc",
                            method: str = PREDICT) -> PredictResult:
        """`predict` on an asyncio loop."""
        signature_name = signature_name or DEFAULT_SIGNATURE
        with self._serving(model_name, version, label, api, method) as servable:
            inputs = get_inputs(servable, signature_name)
            try:
                outputs = await self._run_async(servable, signature_name, inputs, output_filter, method)
            finally:
                self._ended(inputs)
            return self._result(servable, signature_name, outputs, output_filter)

    async def infer_async(self, model_name: str, version: int | None, label: str | None,
                          plan: Callable[[Servable], list[tuple[str, dict[str, np.ndarray]]]], api: str = "grpc",
                          method: str = PREDICT) -> tuple[int, list[dict[str, np.ndarray]]]:
        """Several signatures of one version on their inputs (MultiInference): plan(servable) checks the request
        against the servable and returns (signature name, inputs) for each; answers the version and each
        signature's outputs, in order."""
        with self._serving(model_name, version, label, api, method) as servable:
            runs = plan(servable)
            try:
                return servable.version, [await self._run_async(servable, signature_name, inputs, None, method)
                                          for signature_name, inputs in runs]
            finally:
                for _, inputs in runs[:1]:  # the tasks share one input
                    self._ended(inputs)

    async def _run_async(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
                         output_filter: list[str] | None, method: str) -> dict[str, np.ndarray]:
        batch_size = self._check(servable, signature_name, inputs, output_filter)
        started = time.monotonic()
        if self.batcher and batch_size:
            outputs = await self.batcher.run_async(servable, signature_name, inputs, batch_size)
        else:
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, servable.run,
                                                                       signature_name, inputs)
        self.metrics.record_runtime(servable.name, servable.version, method, time.monotonic() - started)
        return outputs

    def _ended(self, inputs: dict[str, np.ndarray]) -> None:
        if self.trimmer:
            self.trimmer.note(input_bytes(inputs))

    def _check(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
               output_filter: list[str] | None) -> int | None:
        """Validates inputs, the request's bounds and the output filter; returns the batch size (None: cannot be
        merged)."""
        batch_size = servable.check_inputs(signature_name, inputs)
        note(batch_size=batch_size)
        self.limits.check(inputs)
        if output_filter:
            known = servable.output_names(signature_name)
            unknown = sorted(set(output_filter) - set(known))
            if unknown:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"output tensor alias not found in signature: {', '.join(unknown)}. "
                                   f"Outputs expected to be in the set {{{', '.join(known)}}}.")
        return batch_size

    @staticmethod
    def _result(servable: Servable, signature_name: str, outputs: dict[str, np.ndarray],
                output_filter: list[str] | None) -> PredictResult:
        if output_filter:
            outputs = {name: outputs[name] for name in output_filter}
        return PredictResult(servable.name, servable.version, signature_name, outputs)
