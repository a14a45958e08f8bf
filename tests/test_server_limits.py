"""The bounds on one request (serving/limits.py), against a real embedded server over gRPC and REST."""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import tensorflow as tf

from serving.limits import declared_pixels
from tests.test_preprocessing import png_declaring
from tests.test_server_support import predict_request, prediction_stub, rest, start_test_server

MAX_IMAGES = 8
MAX_PIXELS = 3 * 1000 * 1000


@pytest.fixture(scope="module")
def server(model_base_path):
    running = start_test_server(model_base_path, max_images_per_request=MAX_IMAGES,
                                max_pixels_per_request=MAX_PIXELS)
    yield running
    running.stop(grace_seconds=1)


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


def test_images_declaring_more_pixels_than_allowed_are_refused_from_their_headers(server, mnist_png_bytes):
    # Each 1000x1000 PNG is within the graph's 4096 px a side; four of them are over the request's 3 Mpx.
    big = png_declaring(1000, 1000)
    assert declared_pixels(big) == 1000 * 1000 and len(big) < 2000
    code, details = grpc_code(server, [big] * 4)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max_pixels_per_request" in details
    status, body = rest_predict(server, [big] * 4)
    assert status == 400 and f"more than {MAX_PIXELS} pixels" in body["error"]
    # Three of them pass the bound and reach the graph, which decodes them (blank: refused as no ink).
    code, details = grpc_code(server, [big] * 3)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max_pixels_per_request" not in details
    # The server goes on answering.
    assert grpc_code(server, [mnist_png_bytes[0][0]])[0] == grpc.StatusCode.OK


def test_bytes_that_are_no_image_count_no_pixels_and_the_graph_refuses_them():
    assert declared_pixels(b"not an image") == 0
    assert declared_pixels(b"") == 0
    assert declared_pixels(png_declaring(4096, 4096)) == 4096 * 4096
    # A header Pillow itself calls a decompression bomb counts as more than any bound.
    assert declared_pixels(png_declaring(60000, 60000)) > 2**60


def test_numeric_inputs_count_their_batch_dimension(server):
    pixels = np.zeros((MAX_IMAGES + 1, 28, 28, 1), np.float32)
    request = predict_request([], signature_name="predict_pixels")
    del request.inputs["image_bytes"]
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    with pytest.raises(grpc.RpcError) as error:
        prediction_stub(server).Predict(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request holds {MAX_IMAGES + 1} images" in error.value.details()


def test_zero_turns_the_bounds_off(model_base_path, mnist_png_bytes):
    running = start_test_server(model_base_path, max_images_per_request=0, max_pixels_per_request=0)
    try:
        images = [png for png, _ in mnist_png_bytes[:MAX_IMAGES + 1]]
        assert grpc_code(running, images)[0] == grpc.StatusCode.OK
    finally:
        running.stop(grace_seconds=1)
