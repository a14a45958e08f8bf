"""The bounds on one request against a real embedded server over gRPC and REST: its images (serving/limits.py)
and the pixels they declare (the model's graph, training/preprocessing.py)."""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tests.test_preprocessing import png_declaring
from tests.test_server_support import predict_request, prediction_stub, rest
from training.preprocessing import MAX_CALL_PIXELS, MAX_SIDE

MAX_IMAGES = 18  # above the 17 images of the pixel test, below the 20 digits of mnist_png_bytes


@pytest.fixture(scope="module")
def server(serve_module):
    return serve_module(max_images_per_request=MAX_IMAGES)


def grpc_code(server, images: list[bytes]) -> tuple[grpc.StatusCode, str]:
    try:
        prediction_stub(server).Predict(predict_request(images), timeout=60)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def rest_predict(server, images: list[bytes]) -> tuple[int, object]:
    body = {"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}
    return rest(server, "/v1/models/mnist:predict", body)


def test_a_request_of_more_images_than_allowed_is_refused_before_it_runs(server, mnist_png_bytes):
    images = [png for png, _ in mnist_png_bytes[:MAX_IMAGES + 1]]
    code, details = grpc_code(server, images)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request holds {MAX_IMAGES + 1} images" in details and "--max_images_per_request" in details
    status, body = rest_predict(server, images)
    assert status == 400 and f"at most {MAX_IMAGES} a request" in body["error"]
    # At the bound it runs, and the answers are the model's.
    assert grpc_code(server, images[:MAX_IMAGES])[0] == grpc.StatusCode.OK
    status, body = rest_predict(server, images[:MAX_IMAGES])
    assert status == 200 and len(body["predictions"]) == MAX_IMAGES


def test_images_declaring_more_pixels_than_a_request_may_hold_are_refused_by_the_graph(server, mnist_png_bytes):
    # Each PNG declares the largest size the graph takes; 16 of them are all a request may declare.
    largest = png_declaring(MAX_SIDE, MAX_SIDE)
    over = MAX_CALL_PIXELS // (MAX_SIDE * MAX_SIDE) + 1
    code, details = grpc_code(server, [largest] * over)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the {over} images of this request declare {over * MAX_SIDE ** 2} pixels in all" in details
    status, body = rest_predict(server, [largest] * over)
    assert status == 400 and f"the limit is {MAX_CALL_PIXELS}" in body["error"]
    # One fewer passes the bound and reaches decoding, which refuses these headers without pixel data.
    code, details = grpc_code(server, [largest] * (over - 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pixels in all" not in details
    # The server goes on answering.
    assert grpc_code(server, [mnist_png_bytes[0][0]])[0] == grpc.StatusCode.OK


def test_numeric_inputs_count_their_batch_dimension(server):
    pixels = np.zeros((MAX_IMAGES + 1, 28, 28, 1), np.float32)
    request = predict_request([], signature_name="predict_pixels")
    del request.inputs["image_bytes"]
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    with pytest.raises(grpc.RpcError) as error:
        prediction_stub(server).Predict(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request holds {MAX_IMAGES + 1} images" in error.value.details()


def test_zero_turns_the_bound_off(serve, mnist_png_bytes):
    running = serve(max_images_per_request=0)
    images = [png for png, _ in mnist_png_bytes[:MAX_IMAGES + 1]]
    assert grpc_code(running, images)[0] == grpc.StatusCode.OK
