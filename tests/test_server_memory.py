"""The trimmer that gives the heap back after bursts of large requests (serving/memory.py): what it counts,
when it trims, and that the server tells it about every request."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.memory import Trimmer, input_bytes
from tests.test_server_support import predict_request, prediction_stub, rest, start_test_server


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


def test_under_traffic_that_never_pauses_the_trimmer_still_trims_every_load_seconds():
    trimmer = Trimmer(large_bytes=1000, quiet_seconds=0.5, load_seconds=0.6)
    if not trimmer.available:
        pytest.skip("no malloc_trim in this C library: the trimmer does nothing here")
    trimmer.start()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # small requests, 300 bytes each, never 0.5 s apart
            trimmer.note(300)
            time.sleep(0.05)
        assert 2 <= trimmer.under_load <= 4  # about every 0.6 s, not once per request
        time.sleep(1.0)  # what ended after the last of them is given back too
        idle_trims = trimmer.trims
        assert idle_trims == trimmer.under_load <= 5
        time.sleep(1.5)  # no request ends: nothing is left to give back
        assert trimmer.trims == idle_trims
        assert trimmer.longest > 0 and "under load" in trimmer.summary()
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


@pytest.mark.parametrize("batching", [False, True], ids=["batching off", "batching on"])
def test_rest_connections_leave_no_tensorflow_state_behind(model_base_path, mnist_png_bytes, batching, tmp_path):
    """Each REST connection has its own thread; TensorFlow keeps state for every thread that runs a function
    and never frees it, so the model must run on the server's long-lived threads, not the connection's."""
    options = {}
    if batching:
        (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 0 }\n")
        options = {"enable_batching": True, "batching_parameters_file": str(tmp_path / "batching.config")}
    server = start_test_server(model_base_path, **options)
    body = {"instances": [{"b64": base64.b64encode(mnist_png_bytes[0][0]).decode()}]}
    try:
        for _ in range(10):  # the server's own threads start and run the model once
            assert rest(server, "/v1/models/mnist:predict", body)[0] == 200
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(150):  # urllib: a new connection, so a new server thread, each time
            assert rest(server, "/v1/models/mnist:predict", body)[0] == 200
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        server.stop(grace_seconds=1)
    grown = sum(stat.count_diff for stat in after.compare_to(before, "filename")
                if stat.traceback[0].filename.endswith(("eager/context.py", "eager/execute.py")))
    assert grown < 50, f"{grown} more blocks held by TensorFlow's per-thread state after 150 connections"


ARENAS_SCRIPT = """
import ctypes, sys, threading
from serving.memory import limit_arenas
print(limit_arenas(int(sys.argv[1])), flush=True)
barrier = threading.Barrier(12)
def allocate():
    held = [bytearray(100_000) for _ in range(20)]
    barrier.wait()  # all twelve alive at once, each with the arena it allocated from
threads = [threading.Thread(target=allocate) for _ in range(12)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.parametrize("limit, most", [(0, None), (2, 2)])
def test_the_arena_limit_caps_glibcs_arenas_however_many_threads_allocate(limit, most):
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc arenas")
    run = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, str(limit)], capture_output=True, text=True,
                         timeout=60, cwd=str(Path(__file__).resolve().parents[1]))
    arenas = run.stderr.count("Arena ")
    assert run.stdout.strip() == str(limit > 0)
    if most is None:
        assert arenas > 2  # the glibc default: an arena for each of the threads, up to 8 a CPU
    else:
        assert 1 <= arenas <= most
