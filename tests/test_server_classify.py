"""Classify, MultiInference and REST :classify on the export's `classification` signature, against the real
embedded server and a real trained model: the same digits as Predict, TF Serving's request rules and errors."""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

from tests.test_server_support import metric_value, predict_request, prediction_stub, rest

CLASSIFY_METHOD = "tensorflow/serving/classify"
FEATURE = "image/encoded"


@pytest.fixture(scope="module")
def server(serve_module):
    return serve_module(monitoring_config_file="serving/monitoring.config")


@pytest.fixture(scope="module")
def stub(server):
    return prediction_stub(server)


@pytest.fixture(scope="module")
def images(mnist_png_bytes):
    return [png for png, _ in mnist_png_bytes[:24]]


def classify_request(images: list[bytes], signature: str = "classification", context: bytes | None = None):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = signature
    if context is None:
        examples = request.input.example_list.examples
    else:
        request.input.example_list_with_context.context.features.feature[FEATURE].bytes_list.value.append(context)
        examples = request.input.example_list_with_context.examples
    for image in images:
        example = examples.add()
        if image is not None:
            example.features.feature[FEATURE].bytes_list.value.append(image)
    return request


def as_scores(result: classification_pb2.ClassificationResult) -> tuple[list[list[str]], np.ndarray]:
    labels = [[c.label for c in row.classes] for row in result.classifications]
    return labels, np.array([[c.score for c in row.classes] for row in result.classifications])


def predict_probabilities(stub, images: list[bytes]) -> np.ndarray:
    return tf.make_ndarray(stub.Predict(predict_request(images), timeout=30).outputs["probabilities"])


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def test_grpc_classify_answers_what_predict_answers(stub, images):
    response = stub.Classify(classify_request(images), timeout=30)

    labels, scores = as_scores(response.result)
    assert labels == [[str(d) for d in range(10)]] * len(images)
    expected = predict_probabilities(stub, images)
    assert scores.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "classification"


def test_rest_classify_answers_what_grpc_classify_answers(server, stub, images):
    status, body = rest(server, "/v1/models/mnist:classify",
                        {"signature_name": "classification", "examples": [{FEATURE: b64(i)} for i in images[:5]]})

    assert status == 200, body
    _, grpc_scores = as_scores(stub.Classify(classify_request(images[:5]), timeout=30).result)
    assert [[label for label, _ in row] for row in body["results"]] == [[str(d) for d in range(10)]] * 5
    np.testing.assert_allclose([[score for _, score in row] for row in body["results"]], grpc_scores, atol=1e-6)


def test_a_context_feature_reaches_every_example_and_an_examples_own_feature_wins(server, stub, images):
    """TF Serving merges the context into each Example (context first, so the Example's own features win)."""
    seven, other = images[0], images[1]
    _, alone = as_scores(stub.Classify(classify_request([seven, other]), timeout=30).result)

    _, merged = as_scores(stub.Classify(classify_request([None, other], context=seven), timeout=30).result)
    status, body = rest(server, "/v1/models/mnist/versions/1:classify",
                        {"signature_name": "classification", "context": {FEATURE: b64(seven)},
                         "examples": [{}, {FEATURE: b64(other)}]})

    np.testing.assert_allclose(merged, alone, atol=1e-5)
    assert status == 200, body
    np.testing.assert_allclose([[s for _, s in row] for row in body["results"]], alone, atol=1e-5)


def test_multi_inference_runs_the_classification_task(stub, images):
    request = inference_pb2.MultiInferenceRequest()
    task = request.tasks.add(method_name=CLASSIFY_METHOD)
    task.model_spec.name, task.model_spec.signature_name = "mnist", "classification"
    request.input.CopyFrom(classify_request(images[:6]).input)

    response = stub.MultiInference(request, timeout=30)

    [result] = response.results
    assert result.model_spec.name == "mnist" and result.model_spec.version.value == 1
    assert result.model_spec.signature_name == "classification"
    _, scores = as_scores(result.classification_result)
    np.testing.assert_allclose(scores, predict_probabilities(stub, images[:6]), atol=1e-5)


def _multi(tasks: list[tuple[str, str, str]], images: list[bytes]):
    request = inference_pb2.MultiInferenceRequest()
    for model, signature, method in tasks:
        task = request.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = model, signature
    request.input.CopyFrom(classify_request(images).input)
    return request


@pytest.mark.parametrize("tasks, code, message", [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no tasks"),
    ([("mnist", "classification", CLASSIFY_METHOD), ("other", "classification", CLASSIFY_METHOD)],
     grpc.StatusCode.INVALID_ARGUMENT, "same model name"),
    ([("mnist", "classification", CLASSIFY_METHOD)] * 2, grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation"),
    ([("mnist", "nope", CLASSIFY_METHOD)], grpc.StatusCode.INVALID_ARGUMENT, "not found in model graph: nope"),
    ([("mnist", "classification", "tensorflow/serving/regress")], grpc.StatusCode.UNIMPLEMENTED,
     "Unsupported signature method_name: tensorflow/serving/regress"),
    ([("mnist", "serving_default", CLASSIFY_METHOD)], grpc.StatusCode.INVALID_ARGUMENT, "one or two output"),
    ([("nope", "classification", CLASSIFY_METHOD)], grpc.StatusCode.NOT_FOUND, "nope"),
])
def test_multi_inference_refuses_what_tf_serving_refuses(stub, images, tasks, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.MultiInference(_multi(tasks, images[:2]), timeout=30)
    assert caught.value.code() == code
    assert message in caught.value.details()


def _int_feature_request(images):
    request = classify_request([])
    request.input.example_list.examples.add().features.feature[FEATURE].int64_list.value.append(7)
    return request


@pytest.mark.parametrize("make_request, code, message", [
    (lambda images: classify_request([]), grpc.StatusCode.INVALID_ARGUMENT, "Input is empty."),
    (lambda images: classify_request(images[:1], signature="serving_default"), grpc.StatusCode.INVALID_ARGUMENT,
     "Expected one or two output Tensors, found 3"),
    (lambda images: classify_request(images[:1], signature="nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "No signature was found with the name: nope"),
    (lambda images: classify_request([None]), grpc.StatusCode.INVALID_ARGUMENT, FEATURE),
    (_int_feature_request, grpc.StatusCode.INVALID_ARGUMENT, FEATURE),
    (lambda images: classify_request([b"\x89PNG\r\n\x1a\n" + b"\0" * 40]), grpc.StatusCode.INVALID_ARGUMENT, "PNG"),
])
def test_classify_mistakes_are_refused_with_what_was_wrong_and_serving_goes_on(stub, images, make_request, code,
                                                                              message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(make_request(images), timeout=30)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert len(stub.Classify(classify_request(images[:1]), timeout=30).result.classifications) == 1


def test_a_context_merged_into_many_examples_cannot_ask_for_gigabytes(stub, images):
    """3 MB of context and 4,000 empty examples would be 12 GB of serialized examples."""
    request = classify_request([None] * 4000, context=b"\0" * (3 << 20))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in caught.value.details() and "limit" in caught.value.details()


def test_regress_stays_unimplemented(server, stub, images):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Regress(regression_pb2.RegressionRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status, body = rest(server, "/v1/models/mnist:regress", {"examples": [{FEATURE: b64(images[0])}]})
    assert status == 501 and "regression" in body["error"]


@pytest.mark.parametrize("body, message", [
    ({"signature_name": "classification"}, "key 'examples' is expected"),
    ({"signature_name": "classification", "examples": []}, "empty array"),
    ({"signature_name": "classification", "examples": {}}, "list/array"),
    ({"signature_name": "classification", "examples": [[1]]}, "Example must be JSON object"),
    ({"signature_name": "classification", "examples": [{FEATURE: None}]}, "unexpected JSON type: null"),
    ({"signature_name": "classification", "examples": [{FEATURE: [[1]]}]}, "unexpected JSON type: array"),
    ({"signature_name": "classification", "examples": [{FEATURE: ["a", 1]}]}, "expecting type: bytes"),
    ({"signature_name": "classification", "examples": [{FEATURE: 2**64}]}, "int64"),
    ({"signature_name": "classification", "examples": [{FEATURE: {"b64": "!!"}}]}, "base64"),
    ({"signature_name": "classification", "examples": [{FEATURE: 7}]}, FEATURE),
    ({"signature_name": 3, "examples": [{FEATURE: "x"}]}, "signature_name"),
    ({"examples": [{FEATURE: "x"}]}, "found 3"),
    ([1], "JSON object"),
])
def test_rest_classify_mistakes_are_400_with_what_was_wrong(server, stub, images, body, message):
    status, answer = rest(server, "/v1/models/mnist:classify", body)
    assert status == 400, answer
    assert message in answer["error"]
    status, answer = rest(server, "/v1/models/mnist:classify",
                          {"signature_name": "classification", "examples": [{FEATURE: b64(images[0])}]})
    assert status == 200 and len(answer["results"]) == 1


def test_classify_requests_are_counted_under_their_own_api(server, stub, images):
    stub.Classify(classify_request(images[:1]), timeout=30)
    status, metrics = rest(server, "/monitoring/prometheus/metrics")
    assert status == 200
    assert metric_value(metrics, ':tensorflow:serving:request_latency_count{model_name="mnist",API="Classify"') >= 1
