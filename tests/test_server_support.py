"""Helpers the server tests share: requests over gRPC and REST, model status, metrics, odd images, waiting.

No tests here. Servers are started in one place, `start_test_server` below, which conftest's `serve` and
`serve_module` fixtures call: test modules ask those fixtures, which also stop what they started. The model
comes from conftest's `model_base_path` (a real tiny trained model); tests that add or break versions work
on their own copy (`copy_model_base`, conftest's `copy_base`).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.server import RunningServer, ServerOptions, start_server


def start_test_server(base_path: Path, **options: Any) -> RunningServer:
    """A real embedded server for base_path on free ports of 127.0.0.1; ServerOptions fields as keywords.
    Tests get servers from conftest's `serve` and `serve_module`, which call this and stop what it started."""
    settings = {"model_name": "mnist", "model_base_path": str(base_path), "host": "127.0.0.1", "port": 0,
                "rest_api_port": 0, "file_system_poll_wait_seconds": 0}
    settings.update(options)
    return start_server(ServerOptions(**settings))


def copy_model_base(model_base_path: Path, target: Path) -> Path:
    shutil.copytree(model_base_path, target)
    return target


def prediction_stub(server: RunningServer) -> prediction_service_pb2_grpc.PredictionServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                                    options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def model_stub(server: RunningServer) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))


def predict_request(images: list[bytes], model: str = "mnist", version: int | None = None,
                    signature_name: str = "") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)]))
    return request


def model_states(server: RunningServer, model: str = "mnist") -> dict[int, tuple[str, str]]:
    """version -> (state name, error message), from GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = model_stub(server).GetModelStatus(request, timeout=10)
    state_name = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: (state_name(s.state), s.status.error_message) for s in response.model_version_status}


def rest(server: RunningServer, path: str, body: Any = None, method: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or text) of one REST call."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """A bounded wait for something the server does in the background (not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(side: int = 13000) -> bytes:
    """A valid ~20 KB 1-bit PNG declaring side x side pixels (13000: ~1 GB once decoded to RGB floats)."""
    rows = (b"\0" * (1 + (side + 7) // 8)) * side
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))


def metric_value(text: str, prefix: str) -> float:
    """Sum of the Prometheus samples whose line starts with prefix."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
