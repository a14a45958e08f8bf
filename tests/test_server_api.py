"""The embedded server's gRPC and REST APIs against a real trained model: answers, metadata, status, errors."""

from __future__ import annotations

import base64
import json
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from tests.test_server_support import (
    decompression_bomb_png,
    metric_value,
    model_stub,
    predict_request,
    prediction_stub,
    rest,
)

ROOT_CONFIG = """
model_config_list {{
  config {{
    name: "mnist"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    version_labels {{ key: "stable" value: 1 }}
  }}
}}
"""


@pytest.fixture(scope="module")
def server(serve_module, model_base_path, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "models.config"
    config.write_text(ROOT_CONFIG.format(base_path=model_base_path))
    return serve_module(model_base_path="", model_config_file=str(config),
                        monitoring_config_file="serving/monitoring.config")


@pytest.fixture(scope="module")
def stub(server):
    return prediction_stub(server)


@pytest.fixture(scope="module")
def digits(mnist_png_bytes):
    return [png for png, _ in mnist_png_bytes], [label for _, label in mnist_png_bytes]


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def assert_good_answer(server, stub, digits) -> None:
    """The server still answers a normal request correctly."""
    images = digits[0]
    response = stub.Predict(predict_request(images[:2]), timeout=30)
    assert tf.make_ndarray(response.outputs["digit"]).shape == (2,)
    status, body = rest(server, "/v1/models/mnist:predict", {"instances": [b64(images[0])]})
    assert status == 200, body
    assert body["predictions"][0]["digit"] in range(10)


def test_grpc_predict_reads_real_digits(stub, digits):
    images, labels = digits
    response = stub.Predict(predict_request(images), timeout=30)
    digit = tf.make_ndarray(response.outputs["digit"])
    probability = tf.make_ndarray(response.outputs["probability"])
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert digit.dtype == np.int64 and probabilities.shape == (len(images), 10)
    np.testing.assert_array_equal(digit, probabilities.argmax(axis=1))
    np.testing.assert_allclose(probability, probabilities.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert (digit == np.array(labels)).mean() >= 0.7
    assert response.model_spec.name == "mnist" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_grpc_version_label_and_output_filter(stub, digits):
    request = predict_request(digits[0][:3])
    request.model_spec.version_label = "stable"
    request.output_filter.append("digit")
    response = stub.Predict(request, timeout=30)
    assert set(response.outputs) == {"digit"}
    assert response.model_spec.version.value == 1


def test_grpc_predict_pixels_signature(stub, digits):
    pixels = np.stack([tf.io.decode_png(png).numpy() for png in digits[0][:4]]).astype(np.float32) / 255.0
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "predict_pixels"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    by_pixels = tf.make_ndarray(stub.Predict(request, timeout=30).outputs["digit"])
    by_bytes = tf.make_ndarray(stub.Predict(predict_request(digits[0][:4]), timeout=30).outputs["digit"])
    np.testing.assert_array_equal(by_pixels, by_bytes)


def test_rest_row_and_columnar_formats_agree_with_grpc(server, stub, digits):
    images = digits[0][:3]
    expected = tf.make_ndarray(stub.Predict(predict_request(images), timeout=30).outputs["digit"]).tolist()

    status, rows = rest(server, "/v1/models/mnist:predict", {"instances": [b64(i) for i in images]})
    assert status == 200, rows
    assert [row["digit"] for row in rows["predictions"]] == expected
    assert set(rows["predictions"][0]) == {"digit", "probability", "probabilities"}
    assert len(rows["predictions"][0]["probabilities"]) == 10

    status, named_rows = rest(server, "/v1/models/mnist/versions/1:predict",
                              {"instances": [{"image_bytes": b64(i)} for i in images]})
    assert status == 200 and named_rows == rows

    status, columns = rest(server, "/v1/models/mnist/labels/stable:predict",
                           {"signature_name": "serving_default", "inputs": {"image_bytes": [b64(i) for i in images]}})
    assert status == 200, columns
    assert columns["outputs"]["digit"] == expected
    assert np.array(columns["outputs"]["probabilities"]).shape == (3, 10)


def test_a_request_of_no_images_gets_no_outputs_and_a_row_format_one_tf_servings_400(server, stub, digits):
    response = stub.Predict(predict_request([]), timeout=30)
    assert tf.make_ndarray(response.outputs["digit"]).shape == (0,)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (0, 10)

    status, columns = rest(server, "/v1/models/mnist:predict", {"inputs": []})
    assert status == 200, columns
    assert columns["outputs"] == {"digit": [], "probability": [], "probabilities": []}
    status, columns = rest(server, "/v1/models/mnist:predict", {"signature_name": "predict_pixels", "inputs": []})
    assert status == 400, columns  # [] is a tensor of shape [0], not [0, 28, 28, 1]

    status, rows = rest(server, "/v1/models/mnist:predict", {"instances": []})
    assert status == 400 and "No values in 'instances' array" in rows["error"], rows
    assert_good_answer(server, stub, digits)


def test_rest_pixels_columnar(server, digits):
    pixels = (tf.io.decode_png(digits[0][0]).numpy().astype(np.float32) / 255.0)[None].tolist()
    status, body = rest(server, "/v1/models/mnist:predict", {"signature_name": "predict_pixels", "inputs": pixels})
    assert status == 200, body
    assert len(body["outputs"]["digit"]) == 1


def test_grpc_metadata_is_a_signature_def_map(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert default.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert set(default.outputs) == {"digit", "probability", "probabilities"}
    assert "predict_pixels" in signatures.signature_def
    assert response.model_spec.version.value == 1


def test_rest_metadata_and_status(server):
    status, body = rest(server, "/v1/models/mnist/versions/1/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    inputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["image_bytes"]["dtype"] == "DT_STRING"

    status, body = rest(server, "/v1/models/mnist")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert rest(server, "/v1/models/mnist/versions/1")[0] == 200


def test_grpc_model_status(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    response = model_stub(server).GetModelStatus(request, timeout=10)
    (entry,) = response.model_version_status
    assert entry.version == 1 and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.mark.parametrize("image", [b"", b"hello, I am not an image", "random", "truncated", "bomb"])
def test_bad_images_are_invalid_argument_then_service_continues(server, stub, digits, image):
    png = digits[0][0]
    image = {"random": np.random.default_rng(0).bytes(600), "truncated": png[:len(png) // 2],
             "bomb": decompression_bomb_png()}.get(image, image)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request([image]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() and "Graph execution error" not in error.value.details()

    status, body = rest(server, "/v1/models/mnist:predict", {"instances": [b64(image)]})
    assert status == 400 and body["error"]
    assert_good_answer(server, stub, digits)


def test_bomb_message_says_what_was_wrong(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request([decompression_bomb_png()]), timeout=60)
    assert "13000" in error.value.details()


@pytest.mark.parametrize("change, code", [
    (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.model_spec.version.__setattr__("value", 42), grpc.StatusCode.NOT_FOUND),
    (lambda r: setattr(r.model_spec, "version_label", "canary"), grpc.StatusCode.NOT_FOUND),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.output_filter.append("nope"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto([1.0])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs.pop("image_bytes"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([1.0, 2.0])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([[b"a"]])), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["image_bytes"].tensor_shape.dim.add(size=5), grpc.StatusCode.INVALID_ARGUMENT),
    # 2,000 images declared, one carried: TensorFlow's rule would repeat it 2,000 times
    (lambda r: setattr(r.inputs["image_bytes"].tensor_shape.dim[0], "size", 2000), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: setattr(r.inputs["image_bytes"].tensor_shape.dim[0], "size", -1), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_request_mistakes(server, stub, digits, change, code):
    request = predict_request(digits[0][:1])
    change(request)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert error.value.details()
    assert_good_answer(server, stub, digits)


@pytest.mark.parametrize("names, message", [
    (["wrong_name"], "input tensor alias not found in signature: wrong_name. "
                     "Inputs expected to be in the set {image_bytes}."),
    (["image_bytes", "extra"], "input tensor alias not found in signature: extra. "
                               "Inputs expected to be in the set {image_bytes}."),
    ([], "Missing input tensor alias(es): image_bytes"),
], ids=["wrong name", "extra name", "no input"])
def test_input_names_are_refused_alike_over_grpc_and_rest(server, stub, digits, names, message):
    image = digits[0][0]
    request = predict_request([])
    del request.inputs["image_bytes"]
    for name in names:
        request.inputs[name].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert (error.value.code(), error.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    for body in ({"inputs": {name: [b64(image)] for name in names}},
                 {"instances": [{name: b64(image) for name in names}]}):
        assert rest(server, "/v1/models/mnist:predict", body) == (400, {"error": message}), body
    assert_good_answer(server, stub, digits)


def test_a_model_name_of_20000_characters_is_not_found_with_a_bounded_message(server, stub, digits):
    request = predict_request(digits[0][:1])
    request.model_spec.name = "m" * 20_000
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.value.details()) < 1100 and error.value.details().endswith("... (20040 characters in all)")
    assert_good_answer(server, stub, digits)


@pytest.mark.parametrize("method", ["/tensorflow.serving.PredictionService/Predict",
                                    "/tensorflow.serving.PredictionService/GetModelMetadata",
                                    "/tensorflow.serving.ModelService/GetModelStatus"])
def test_bytes_that_are_not_the_request_message_are_invalid_argument(server, stub, digits, method):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as error:
            call(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Malformed" in error.value.details()
    assert_good_answer(server, stub, digits)


def test_grpc_oversized_request_is_resource_exhausted(server, stub, digits):
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request([b"\0" * (17 * 1024 * 1024)]), timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_good_answer(server, stub, digits)


@pytest.mark.parametrize("path, body, raw, method, status", [
    ("/v1/models/mnist:predict", None, b"{not json", "POST", 400),
    ("/v1/models/mnist:predict", None, b"\xff\xfe", "POST", 400),
    ("/v1/models/mnist:predict", None, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "POST", 400),
    ("/v1/models/mnist:predict", None, b'{"instances": [' + b"7" * 5000 + b"]}", "POST", 400),
    ("/v1/models/mnist:predict", None, b'{"instances": ["\\ud800"]}', "POST", 400),
    ("/v1/models/mnist:predict", {"instances": [{"b64": "!!not base64!!"}]}, None, "POST", 400),
    ("/v1/models/mnist:predict", {"instances": [3.5]}, None, "POST", 400),
    ("/v1/models/mnist:predict", {"instances": "x"}, None, "POST", 400),
    ("/v1/models/mnist:predict", {"nothing": []}, None, "POST", 400),
    ("/v1/models/mnist:predict", [1, 2], None, "POST", 400),
    ("/v1/models/mnist:predict", {"inputs": {"wrong_name": ["a"]}}, None, "POST", 400),
    ("/v1/models/mnist:predict", {"signature_name": "nope", "instances": ["a"]}, None, "POST", 400),
    ("/v1/models/mnist:predict", {"signature_name": "predict_pixels", "inputs": [[1, 2], [3]]}, None, "POST", 400),
    ("/v1/models/nope:predict", {"instances": ["a"]}, None, "POST", 404),
    ("/v1/models/mnist/versions/42:predict", {"instances": ["a"]}, None, "POST", 404),
    ("/v1/models/mnist/versions/42", None, None, "GET", 404),
    ("/v1/models/mnist/versions/x/metadata", None, None, "GET", 400),
    ("/v1/models/nope/metadata", None, None, "GET", 404),
    ("/v2/whatever", None, None, "GET", 404),
    ("/v1/models/mnist:predict", None, None, "GET", 405),
    ("/v1/models/mnist", {}, None, "POST", 405),
    ("/v1/models/mnist", None, None, "DELETE", 405),
])
def test_rest_request_mistakes(server, stub, digits, path, body, raw, method, status):
    got, answer = rest(server, path, body, method=method, raw=raw)
    assert got == status, answer
    assert isinstance(answer, dict) and answer["error"]
    assert_good_answer(server, stub, digits)


def _raw_http(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_rest_oversized_body_is_413_before_reading_it(server, stub, digits):
    answer = _raw_http(server, b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 100000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    answer = _raw_http(server, b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")
    assert_good_answer(server, stub, digits)


def test_rest_version_with_a_digit_python_reads_but_int_does_not_is_400(server, stub, digits):
    body = b'{"instances": ["a"]}'
    answer = _raw_http(server, b"POST /v1/models/mnist/versions/\xb9:predict HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert answer.startswith(b"HTTP/1.1 400") and b"Version must be an integer" in answer
    assert_good_answer(server, stub, digits)


@pytest.mark.parametrize("request_line, status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /v1/models/mnist HTTP/9.9\r\n\r\n", b"505"),
    (b"GET /v1/models/mnist HTTP/x\r\n\r\n", b"400"),
    (b"GET /v1/models/mnist\r\n", b"400"),  # HTTP/0.9: answered at once, not after the read timeout
])
def test_rest_request_lines_the_server_cannot_read_get_a_json_error_with_a_status_line(
        server, stub, digits, request_line, status):
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(request_line)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status) or head.startswith(b"HTTP/1.0 " + status), answer
    assert json.loads(body)["error"]
    assert_good_answer(server, stub, digits)


def test_rest_keep_alive_serves_several_requests_on_one_connection(server):
    request = b"GET /v1/models/mnist HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(request + request[:-2] + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2


def test_a_model_name_cannot_inject_metrics_or_add_series_without_end(server, stub, digits):
    for i in range(20):
        request = predict_request(digits[0][:1])
        request.model_spec.name = f'x{i}"}} 1\ninjected_metric{{source="attacker"}} 42\n#'
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    _, text = rest(server, "/monitoring/prometheus/metrics")
    assert not any(line.startswith("injected_metric") for line in text.splitlines())
    assert "attacker" not in text
    unknown = [line for line in text.splitlines() if 'status="NOT_FOUND"' in line and 'api="grpc"' in line]
    assert len(unknown) == 1 and unknown[0].startswith(':tensorflow:serving:request_count{model_name="",')
    assert metric_value(text, unknown[0].rsplit(" ", 1)[0]) >= 20


def test_prometheus_metrics_count_requests(server, stub, digits):
    ok = ':tensorflow:serving:request_count{model_name="mnist",version="1",api="grpc",status="OK"}'
    status, text = rest(server, "/monitoring/prometheus/metrics")
    before = metric_value(text, ok)
    stub.Predict(predict_request(digits[0][:1]), timeout=30)
    status, text = rest(server, "/monitoring/prometheus/metrics")
    assert status == 200
    after = metric_value(text, ok)
    assert after == before + 1
    assert ":tensorflow:serving:request_latency_bucket" in text


def test_rest_strings_are_not_padded_to_the_longest_one():
    """np.shape on 2,001 strings builds a fixed-width array of 2,001 x 200 KB (400 MB) before anything is
    checked; the request's arrays must cost what the request does."""
    import tracemalloc

    from serving.tensors import json_to_array

    value = ["x" * 200_000] + [""] * 2000
    tracemalloc.start()
    try:
        array = json_to_array(value, tf.TensorSpec([None], tf.string), "image_bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert array.shape == (2001,) and array.dtype == object and array[0] == b"x" * 200_000 and array[1] == b""
    assert peak < 20 * 1024 * 1024, peak
    nested = json_to_array([["a", "b"], ["c", "d"]], tf.TensorSpec([None, 2], tf.string), "x")
    assert nested.shape == (2, 2) and nested[1, 0] == b"c"


# What a fuzzing run (bench/fuzz.py, docs/fuzzing.md) found: each answered 500, answered twice, or held memory.

def test_rest_version_beyond_int64_is_400_not_500(server, stub, digits):
    for digits_in_version in (20, 4301):  # 4,301: past what int() reads, which raised ValueError
        status, body = rest(server, f"/v1/models/mnist/versions/{'1' * digits_in_version}")
        assert status == 400 and "Version must be an integer (int64)" in body["error"]
    assert_good_answer(server, stub, digits)


def test_rest_strings_nested_deeper_than_any_tensor_are_400_not_500(server, stub, digits):
    status, body = rest(server, "/v1/models/mnist:predict", raw=b'{"instances": ' + b"[" * 65 + b"]" * 65 + b"}")
    assert status == 400 and "65 lists deep" in body["error"]
    assert_good_answer(server, stub, digits)


@pytest.mark.parametrize("request_line", [b"GET /v1/models/mnist", b"POST /v1/models/mnist:regress",
                                          b"POST /v1/nothing"])
def test_a_body_the_server_does_not_read_is_never_read_as_the_next_request(server, stub, digits, request_line):
    smuggled = b"GET /v1/models/nosuch HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as sock:
        sock.sendall(request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its one answer
            answer += chunk
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer and b"nosuch" not in answer
    assert_good_answer(server, stub, digits)


def _tensor(dtype: int, dims: list[int], unknown_rank: bool = False, **values) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    tensor = request.inputs["image_bytes"]
    tensor.dtype = dtype
    tensor.tensor_shape.unknown_rank = unknown_rank
    for size in dims:
        tensor.tensor_shape.dim.add(size=size)
    for field, value in values.items():
        getattr(tensor, field).extend(value)
    return request


@pytest.mark.parametrize("request_, message", [
    (_tensor(types_pb2.DT_HALF, [2 * 10**8], half_val=[1]), "declares 200000000 values in its shape but carries 1"),
    (_tensor(types_pb2.DT_COMPLEX64, [5 * 10**7], scomplex_val=[1, 2]), "declares 50000000 values"),
    (_tensor(types_pb2.DT_UINT32, [5 * 10**7, 14], uint32_val=[1]), "declares 700000000 values"),
    (_tensor(types_pb2.DT_STRING, [3 * 10**7], unknown_rank=True, string_val=[b"x"]), "unknown rank"),
    (_tensor(types_pb2.DT_QINT32, [3, 10**6], int_val=[1]), "DT_QINT32, which a request cannot carry"),
    (_tensor(types_pb2.DT_FLOAT, [10**8]), "carries 0"),
])
def test_a_few_bytes_of_tensor_cannot_ask_for_gigabytes_of_any_dtype(server, stub, digits, request_, message):
    """By TensorFlow's rule the last value fills the declared shape: 40 bytes of DT_HALF cost 382 MB and held
    the gRPC loop for 1.7 s; only some dtypes were checked."""
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request_, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
    assert_good_answer(server, stub, digits)


def test_a_refused_grpc_request_leaves_none_of_its_arrays_behind(server, stub):
    """The AbortError grpc.aio keeps held, through its context's traceback, every array of a refused request
    until the cyclic collector ran: nine refused requests held 4.2 GB."""
    import gc
    import tracemalloc

    request = predict_request([b"\x01" * (4 << 20), b"\x02" * (4 << 20)])  # 8 MB of strings, not images
    gc.collect()
    gc.disable()  # the collector would free them anyway, later: the test is that nothing waits for it
    tracemalloc.start()
    try:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The server may still be finishing the last call when its status arrives (its request, 8 MB, is still
        # alive then): give it a moment. With the arrays' cycle every request's arrays stayed (40 MB).
        deadline = time.monotonic() + 5
        while (held := tracemalloc.get_traced_memory()[0]) >= 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 4 << 20, f"{held / 2**20:.1f} MB still held after five refused 8 MB requests"
