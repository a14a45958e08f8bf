"""Predict, shared by the gRPC and REST front ends: find the servable, check the inputs, run, filter."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from serving.batching import Batcher
from serving.errors import ServingError
from serving.metrics import Metrics
from serving.models import DEFAULT_SIGNATURE, ModelManager, Servable


@dataclass
class PredictResult:
    model_name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


class Predictor:
    def __init__(self, manager: ModelManager, batcher: Batcher | None, metrics: Metrics) -> None:
        self.manager, self.batcher, self.metrics = manager, batcher, metrics

    def predict(self, model_name: str, version: int | None, label: str | None, signature_name: str,
                get_inputs: Callable[[Servable, str], dict[str, np.ndarray]], output_filter: list[str] | None = None,
                api: str = "grpc") -> PredictResult:
        """get_inputs(servable, signature_name) builds the input arrays once the servable is known."""
        started = time.monotonic()
        status = "OK"
        signature_name = signature_name or DEFAULT_SIGNATURE
        try:
            with self.manager.acquire(model_name, version, label) as servable:
                inputs = get_inputs(servable, signature_name)
                return self._run(servable, signature_name, inputs, output_filter)
        except ServingError as e:
            status = e.code.name
            raise
        finally:
            self.metrics.record_request(model_name, api, status, time.monotonic() - started)

    def _run(self, servable: Servable, signature_name: str, inputs: dict[str, np.ndarray],
             output_filter: list[str] | None) -> PredictResult:
        batch_size = servable.check_inputs(signature_name, inputs)
        known = servable.output_names(signature_name)
        unknown = sorted(set(output_filter or ()) - set(known))
        if unknown:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output tensor alias not found in signature: {', '.join(unknown)}. "
                               f"Outputs expected to be in the set {{{', '.join(known)}}}.")
        if self.batcher and batch_size:
            outputs = self.batcher.run(servable, signature_name, inputs, batch_size)
        else:
            outputs = servable.run(signature_name, inputs)
        if output_filter:
            outputs = {name: outputs[name] for name in output_filter}
        return PredictResult(servable.name, servable.version, signature_name, outputs)
