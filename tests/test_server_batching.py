"""Server-side batching: concurrent requests merge into one signature call, a bad image fails only its request."""

from __future__ import annotations

import base64
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf

from serving.batching import Batcher, BatchingOptions
from tests.test_server_support import (
    decompression_bomb_png,
    metric_value,
    predict_request,
    prediction_stub,
    rest,
    wait_for,
)

BATCH = 8
# A batch only leaves the queue when full (the timeout is far longer than the test), so a group of BATCH
# concurrent requests is exactly one merged call however slow the machine is.
BATCHING_CONFIG = f"""
max_batch_size {{ value: {BATCH} }}
batch_timeout_micros {{ value: 60000000 }}
num_batch_threads {{ value: 2 }}
max_enqueued_batches {{ value: 10 }}
"""


@pytest.fixture(scope="module")
def server(serve_module, tmp_path_factory):
    config = tmp_path_factory.mktemp("batching") / "batching.config"
    config.write_text(BATCHING_CONFIG)
    return serve_module(enable_batching=True, batching_parameters_file=str(config),
                        monitoring_config_file="serving/monitoring.config")


@pytest.fixture(scope="module")
def expected(model_base_path, mnist_png_bytes):
    """Digits for the first BATCH images, straight from the SavedModel without the server."""
    signature = tf.saved_model.load(str(model_base_path / "1")).signatures["serving_default"]
    images = [png for png, _ in mnist_png_bytes[:BATCH]]
    return images, signature(image_bytes=tf.constant(images))["digit"].numpy()


def batch_stats(server) -> tuple[float, float]:
    """(number of merged calls, images in them) from the Prometheus endpoint."""
    status, text = rest(server, "/monitoring/prometheus/metrics")
    assert status == 200
    name = ":tensorflow:serving:batching_session:processed_batch_size"
    return metric_value(text, f"{name}_count"), metric_value(text, f"{name}_sum")


def test_concurrent_requests_are_merged_into_one_call(server, expected):
    images, digits = expected
    stub = prediction_stub(server)
    calls_before, images_before = batch_stats(server)
    futures = [stub.Predict.future(predict_request([image]), timeout=120) for image in images]
    answers = [tf.make_ndarray(f.result().outputs["digit"]) for f in futures]
    assert [a.shape for a in answers] == [(1,)] * BATCH
    np.testing.assert_array_equal(np.concatenate(answers), digits)  # each got its own row back
    calls_after, images_after = batch_stats(server)
    assert (calls_after - calls_before, images_after - images_before) == (1, BATCH)


def test_bad_image_in_a_merged_batch_fails_only_its_request(server, expected):
    images, digits = expected
    stub = prediction_stub(server)
    calls_before, _ = batch_stats(server)
    requests = [[image] for image in images[:BATCH - 2]] + [[b"not an image"], [decompression_bomb_png()]]
    futures = [stub.Predict.future(predict_request(r), timeout=120) for r in requests]
    good = [tf.make_ndarray(f.result().outputs["digit"]) for f in futures[:BATCH - 2]]
    np.testing.assert_array_equal(np.concatenate(good), digits[:BATCH - 2])
    for future in futures[BATCH - 2:]:
        with pytest.raises(grpc.RpcError) as error:
            future.result()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert batch_stats(server)[0] == calls_before + 1


def test_a_request_of_no_images_is_answered_at_once_not_queued_for_company(server):
    """Nothing to merge: it must not wait out the batch timeout (a minute here) for other requests."""
    response = prediction_stub(server).Predict(predict_request([]), timeout=20)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (0, 10)


def test_request_larger_than_max_batch_size_still_runs(server, mnist_png_bytes):
    images = [png for png, _ in mnist_png_bytes[:BATCH + 3]]
    response = prediction_stub(server).Predict(predict_request(images), timeout=120)
    assert tf.make_ndarray(response.outputs["digit"]).shape == (BATCH + 3,)


def test_a_request_larger_than_the_whole_queue_is_invalid_not_unavailable(server, mnist_png_bytes):
    """UNAVAILABLE tells a client to retry; a request of more images than the queue holds never fits."""
    images = [mnist_png_bytes[0][0]] * (10 * BATCH + 1)
    with pytest.raises(grpc.RpcError) as error:
        prediction_stub(server).Predict(predict_request(images), timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 81 is larger than the batch queue can hold (80" in error.value.details()
    response = prediction_stub(server).Predict(predict_request(images[:BATCH * 10]), timeout=120)
    assert tf.make_ndarray(response.outputs["digit"]).shape == (BATCH * 10,)


def test_a_client_that_gives_up_does_not_disturb_its_batch(server, expected):
    """A cancelled call's slot still runs (its batch leaves when full); the others get their own answers."""
    images, digits = expected
    stub = prediction_stub(server)
    calls_before, images_before = batch_stats(server)
    futures = [stub.Predict.future(predict_request([image]), timeout=120) for image in images[:BATCH - 1]]
    gone = futures.pop(0)
    wait_for(lambda: server.batcher.queued() == BATCH - 1, what="the calls to reach the batch queue")
    gone.cancel()
    futures.append(stub.Predict.future(predict_request([images[-1]]), timeout=120))
    answers = [tf.make_ndarray(f.result().outputs["digit"]) for f in futures]
    np.testing.assert_array_equal(np.concatenate(answers), digits[1:])
    assert batch_stats(server) == (calls_before + 1, images_before + BATCH)
    assert tf.make_ndarray(stub.Predict(predict_request(images[:BATCH]), timeout=120).outputs["digit"]).shape == (
        BATCH,)


@pytest.mark.parametrize("timeout_micros", [0, 1000], ids=["on the caller's thread", "on a batch thread"])
def test_a_refused_request_leaves_nothing_of_itself_behind_in_the_batcher(model_base_path, timeout_micros):
    """The error a batch stored on its task led back to the task through its traceback, and so did the frame
    that re-raised it: each refused request's inputs (and the REST body or gRPC request above them) stayed
    until the cyclic collector ran (the soak: 4.1 GB with batching, docs/soak.md)."""
    import asyncio
    import gc
    import weakref

    from serving.errors import ServingError
    from serving.models import Servable

    servable = Servable("mnist", 1, model_base_path / "1")
    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=timeout_micros, num_batch_threads=1))

    def refused() -> tuple[dict, weakref.ref]:
        inputs = {"image_bytes": np.array([b"not an image" * 1000], dtype=object)}
        return inputs, weakref.ref(inputs["image_bytes"])

    async def ask_async(inputs) -> grpc.StatusCode:
        try:
            await batcher.run_async(servable, "serving_default", inputs, 1)
        except ServingError as e:
            return e.code

    gc.collect()
    gc.disable()  # the collector would free them later: the test is that nothing waits for it
    try:
        inputs, alive = refused()
        with pytest.raises(ServingError) as error:
            batcher.run(servable, "serving_default", inputs, 1)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "image" in error.value.message
        del inputs, error
        # The batch thread lets go of its batch just after it hands the answers over: a moment, not the collector.
        wait_for(lambda: alive() is None, timeout=5, what="a refused request's inputs to be freed (run)")

        inputs, alive = refused()
        assert asyncio.run(ask_async(inputs)) == grpc.StatusCode.INVALID_ARGUMENT
        del inputs
        wait_for(lambda: alive() is None, timeout=5, what="a refused request's inputs to be freed (run_async)")
    finally:
        gc.enable()
        batcher.stop()


class RowServable:
    """What the Batcher asks of a servable, run(signature_name, inputs) and an identity, and no more: answers
    y = 10 x + 1 for each row of input x and notes the rows of each call. While its gate is closed a call waits,
    as a long batch holds its batch thread."""

    def __init__(self, gate_open: bool = True) -> None:
        self.rows_per_call: list[int] = []
        self.running = threading.Event()
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()

    def run(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        assert self.gate.wait(timeout=120), "the gate was never opened"
        self.rows_per_call.append(len(inputs["x"]))
        return {"y": 10 * inputs["x"] + 1}


def hold_the_batch_slot(batcher: Batcher) -> tuple[RowServable, threading.Thread]:
    """Occupies the batcher's one batch slot with a call that waits for its gate (`.gate.set()` ends it): what
    arrives meanwhile queues up."""
    slow = RowServable(gate_open=False)
    thread = threading.Thread(target=batcher.run, args=(slow, "serving_default", {"x": np.zeros((1, 1))}, 1),
                              name="holds-the-slot")
    thread.start()
    assert slow.running.wait(timeout=30), "the slow call never started"
    return slow, thread


@pytest.mark.parametrize("requests, padded_to", [([[1, 2], [3]], 4), ([[1, 2], [3], [4, 5]], 8)],
                         ids=["3 rows run as 4", "5 rows run as 8"])
def test_a_merged_batch_is_padded_to_an_allowed_size_and_each_request_gets_only_its_rows(requests, padded_to):
    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=0, num_batch_threads=1,
                                      allowed_batch_sizes=(2, 4, 8)))
    model = RowServable()
    answers: dict[int, np.ndarray] = {}

    def ask(i: int) -> None:
        x = np.array(requests[i], dtype=np.float32).reshape(-1, 1)
        answers[i] = batcher.run(model, "serving_default", {"x": x}, len(x))["y"]

    slow, holder = hold_the_batch_slot(batcher)
    askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    try:
        for thread in askers:
            thread.start()
        wait_for(lambda: batcher.queued() == len(requests), what="the requests to queue behind the slow call")
    finally:
        slow.gate.set()  # the slot frees: what is queued leaves as one batch
        for thread in [holder, *askers]:
            thread.join(timeout=60)
        batcher.stop()
    assert model.rows_per_call == [padded_to]
    for i, rows in enumerate(requests):
        np.testing.assert_array_equal(answers[i], 10 * np.array(rows, dtype=np.float32).reshape(-1, 1) + 1)


QUEUE_FULL_CONFIG = """
max_batch_size { value: 2 }
batch_timeout_micros { value: 0 }
num_batch_threads { value: 1 }
max_enqueued_batches { value: 2 }
"""


def test_a_full_batch_queue_answers_unavailable_and_the_server_keeps_serving(serve, tmp_path, expected):
    """Its one batch slot held, the queue takes max_enqueued_batches x max_batch_size = 4 images; a fifth is
    refused at once with TF Serving's UNAVAILABLE (HTTP 503), a status that tells a client to try again."""
    images, digits = expected
    config = tmp_path / "batching.config"
    config.write_text(QUEUE_FULL_CONFIG)
    running = serve(enable_batching=True, batching_parameters_file=str(config))
    slow, holder = hold_the_batch_slot(running.batcher)
    try:
        stub = prediction_stub(running)
        queued = [stub.Predict.future(predict_request(images[i:i + 2]), timeout=120) for i in (0, 2)]
        wait_for(lambda: running.batcher.queued() == 2, what="4 images in the batch queue")

        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(predict_request(images[4:5]), timeout=20)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
        assert "queue" in error.value.details() and "full" in error.value.details()
        status, body = rest(running, "/v1/models/mnist:predict",
                            {"instances": [{"b64": base64.b64encode(images[4]).decode()}]})
        assert status == 503 and "full" in body["error"], body

        slow.gate.set()
        answers = [tf.make_ndarray(future.result().outputs["digit"]) for future in queued]
        np.testing.assert_array_equal(np.concatenate(answers), digits[:4])
        again = stub.Predict(predict_request(images[4:6]), timeout=120)
        np.testing.assert_array_equal(tf.make_ndarray(again.outputs["digit"]), digits[4:6])
        status, body = rest(running, "/v1/models/mnist:predict",
                            {"instances": [{"b64": base64.b64encode(images[4]).decode()}]})
        assert status == 200 and body["predictions"][0]["digit"] == digits[4], body
    finally:
        slow.gate.set()
        holder.join(timeout=60)
        running.stop(grace_seconds=5)
