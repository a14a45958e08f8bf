"""The trimmer that gives the heap back after bursts of large requests (serving/memory.py): what it counts,
when it trims, and that the server tells it about every request."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from serving.memory import Trimmer, input_bytes
from tests.test_server_support import predict_request, prediction_stub, start_test_server


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_input_bytes_counts_encoded_images_by_their_length_and_arrays_by_their_size():
    assert input_bytes({"image_bytes": np.array([b"a" * 10, b"b" * 5, b""], dtype=object)}) == 15
    assert input_bytes({"pixels": np.zeros((2, 28, 28, 1), np.float32), "k": np.array([1], np.int64)}) == 6280


def test_the_trimmer_trims_once_a_burst_of_large_requests_is_over_and_not_after_small_ones():
    trimmer = Trimmer(large_bytes=1000, quiet_seconds=0.2)
    if not trimmer.available:
        pytest.skip("no malloc_trim in this C library: the trimmer does nothing here")
    trimmer.start()
    try:
        trimmer.note(999)  # small: nothing to give back
        time.sleep(0.6)
        assert trimmer.trims == 0
        for _ in range(5):  # a burst: one trim when it is over, not one a request
            trimmer.note(1000)
            time.sleep(0.02)
        assert wait_until(lambda: trimmer.trims == 1)
        time.sleep(0.6)
        assert trimmer.trims == 1
        trimmer.note(5000)
        assert wait_until(lambda: trimmer.trims == 2)
    finally:
        trimmer.stop()


def test_the_server_tells_the_trimmer_of_large_requests_refused_or_answered(model_base_path, mnist_png_bytes):
    server = start_test_server(model_base_path)
    try:
        trimmer = server.trimmer
        if not trimmer.available:
            pytest.skip("no malloc_trim in this C library")
        trimmer.quiet_seconds = 0.2
        stub = prediction_stub(server)
        stub.Predict(predict_request([png for png, _ in mnist_png_bytes[:4]]), timeout=30)  # small
        time.sleep(0.8)
        assert trimmer.trims == 0
        with pytest.raises(grpc.RpcError) as error:  # 2 MB that are no image: refused, still a large request
            stub.Predict(predict_request([b"\x00" * (2 << 20)]), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert wait_until(lambda: trimmer.trims == 1)
    finally:
        server.stop(grace_seconds=1)
