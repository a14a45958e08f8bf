"""Classify and MultiInference as TF Serving runs them (servables/tensorflow/classifier.cc, multi_inference.cc,
util.cc), for both front ends.

A request's tf.Examples become one string tensor, fed to the signature's one input, `inputs` (each Example
serialized; with a context, the context's bytes first, so that the Example's own features win, as the
protobuf merge of the two would). The signature's `classes` and/or `scores` outputs, [examples, classes]
each, become a ClassificationResult. REST's `:classify` body is read into the same Input message as TF
Serving's json_tensor.cc reads it, and answered as {"results": [[[label, score], ...], ...]}.

As tensorflow_model_server does by default (`--enable_signature_method_name_check=false`), a signature's method
name is not checked, its inputs and outputs are: TF2 exports record every signature with the predict method.
Regression is not served: no model of ours has a regression signature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import classification_pb2, inference_pb2, input_pb2

from serving.errors import ServingError
from serving.models import DEFAULT_SIGNATURE, Servable

CLASSIFY = "Classify"  # the API label of the metrics and the method of the access log, as TF Serving names them
MULTI_INFERENCE = "MultiInference"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
INPUTS, CLASSES, SCORES = "inputs", "classes", "scores"  # signature_constants' CLASSIFY_* keys
_INT64 = (-(2**63), 2**63 - 1)
# The serialized examples a request may make: four times the largest request (serving/rest.py, the gRPC limit).
MAX_EXAMPLES_BYTES = 64 * 1024 * 1024


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """The string tensor TF Serving feeds a classification signature: one serialized Example per row."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [example.SerializeToString() for example in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        context = listed.context.SerializeToString()
        size = len(context) * len(listed.examples) + sum(example.ByteSize() for example in listed.examples)
        if size > MAX_EXAMPLES_BYTES:  # a 15 MB context and 4,096 empty examples would make 61 GB
            raise _invalid(f"The context ({len(context)} bytes) merged into each of {len(listed.examples)} examples "
                           f"makes {size} bytes, more than the limit of {MAX_EXAMPLES_BYTES}: send a smaller context "
                           "or fewer examples per request")
        examples = [context + example.SerializeToString() for example in listed.examples]
    else:
        examples = []
    if not examples:
        raise _invalid("Input is empty.")
    array = np.empty(len(examples), dtype=object)
    array[:] = examples
    return array


def example_count(request_input: input_pb2.Input) -> int:
    kind = request_input.WhichOneof("kind")
    return len(getattr(request_input, kind).examples) if kind else 0


def classification_signature(servable: Servable, signature_name: str):
    """The SignatureDef, checked as TF Serving's PreProcessClassification checks it."""
    signature_name = signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise _invalid(f"No signature was found with the name: {signature_name}")
    if len(signature.inputs) != 1:
        raise _invalid(f"Expected one input Tensor. Signature '{signature_name}' has {len(signature.inputs)}")
    if len(signature.outputs) not in (1, 2):
        raise _invalid(f"Expected one or two output Tensors, found {len(signature.outputs)} in signature "
                       f"'{signature_name}': Classify needs a classification signature (outputs '{CLASSES}' "
                       f"and/or '{SCORES}')")
    if INPUTS not in signature.inputs:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"No classification inputs found in SignatureDef '{signature_name}': its input is "
                           f"'{next(iter(signature.inputs))}', a classification signature's is '{INPUTS}'")
    if CLASSES not in signature.outputs and SCORES not in signature.outputs:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Expected classification signature outputs to contain at least one of "{CLASSES}" or '
                           f'"{SCORES}". Signature \'{signature_name}\' has {sorted(signature.outputs)}')
    return signature


def classification_inputs(servable: Servable, signature_name: str,
                          request_input: input_pb2.Input) -> dict[str, np.ndarray]:
    """What runs a Classify: the signature checked first, then the examples, in TF Serving's order."""
    classification_signature(servable, signature_name)
    return {INPUTS: serialized_examples(request_input)}


def classification_result(outputs: dict[str, np.ndarray], examples: int) -> classification_pb2.ClassificationResult:
    """The signature's outputs as a ClassificationResult, checked as PostProcessClassificationResult does."""
    classes, scores = outputs.get(CLASSES), outputs.get(SCORES)
    for name, array in ((CLASSES, classes), (SCORES, scores)):
        if array is None:
            continue
        if array.ndim != 2:
            raise _invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(array.shape)} ({name})")
        if name == CLASSES and array.dtype != object and array.dtype.kind != "S":
            raise _invalid(f"Expected classes Tensor of DT_STRING. Got: {array.dtype}")
        if name == SCORES and array.dtype != np.float32:
            raise _invalid(f"Expected scores Tensor of DT_FLOAT. Got: {array.dtype}")
        if array.shape[0] != examples:
            raise _invalid(f"Expected {name} output batch size of {examples}. Got: {array.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise ServingError(grpc.StatusCode.INTERNAL, "Tensors class and score should match in dim_size(1). "
                                                     f"Got {classes.shape[1]} vs. {scores.shape[1]}")
    count = (classes if classes is not None else scores).shape[1]
    result = classification_pb2.ClassificationResult()
    for row in range(examples):
        classifications = result.classifications.add()
        for column in range(count):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = bytes(classes[row, column]).decode("utf-8", errors="replace")
            if scores is not None:
                entry.score = scores[row, column]
    return result


def multi_inference_plan(request: inference_pb2.MultiInferenceRequest, servable: Servable,
                         ) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(signature, inputs) for each task, checked as TensorFlowMultiInferenceRunner::Infer checks them."""
    model_name, input_tensor, seen = "", "", set()
    for task in request.tasks:
        if not task.model_spec.name:
            raise _invalid("Found ModelSpec with an empty model name.")
        if model_name and task.model_spec.name != model_name:
            raise _invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        model_name = task.model_spec.name
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name in seen:
            raise _invalid(f"Duplicate evaluation of signature: {signature_name}")
        seen.add(signature_name)
        if signature_name not in servable.signature_defs:
            raise _invalid(f"Requested signature not found in model graph: {signature_name}")
        if task.method_name != CLASSIFY_METHOD:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}"
                               f" (this server runs {CLASSIFY_METHOD} tasks; the model has no regression signature)")
        name = classification_signature(servable, signature_name).inputs[INPUTS].name
        if input_tensor and name != input_tensor:
            raise _invalid("Input tensor must be the same for all Signatures.")
        input_tensor = name
    examples = {INPUTS: serialized_examples(request.input)}
    return [(task.model_spec.signature_name or DEFAULT_SIGNATURE, examples) for task in request.tasks]


def multi_inference_response(request: inference_pb2.MultiInferenceRequest, version: int,
                             outputs: Sequence[dict[str, np.ndarray]]) -> inference_pb2.MultiInferenceResponse:
    response = inference_pb2.MultiInferenceResponse()
    examples = example_count(request.input)
    for task, task_outputs in zip(request.tasks, outputs, strict=True):
        result = response.results.add()
        result.classification_result.CopyFrom(classification_result(task_outputs, examples))
        result.model_spec.name = task.model_spec.name
        result.model_spec.signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        result.model_spec.version.value = version
    return response


# REST: the JSON body of :classify, read as json_tensor.cc's FillClassifyRegressRequestFromJson reads it.

def input_from_json(body: Any) -> tuple[str, input_pb2.Input]:
    """{"signature_name": ..., "context": {feature: value}, "examples": [{feature: value}, ...]} -> the signature
    name and the Input message."""
    if not isinstance(body, dict):
        raise _invalid('Request body must be a JSON object with "examples"')
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise _invalid('"signature_name" must be a string')
    request_input = input_pb2.Input()
    examples = body.get("examples")
    if "context" in body:
        _example_from_json(body["context"], request_input.example_list_with_context.context)
        add_example = request_input.example_list_with_context.examples.add
    else:
        add_example = request_input.example_list.examples.add
    if examples is None:
        raise _invalid("When method is classify, key 'examples' is expected and was not found")
    if not isinstance(examples, list):
        raise _invalid("Expecting 'examples' value to be an list/array")
    if not examples:
        raise _invalid("'examples' value is an empty array")
    for example in examples:
        _example_from_json(example, add_example())
    return signature_name, request_input


def _example_from_json(value: Any, example: example_pb2.Example) -> None:
    if not isinstance(value, dict):
        raise _invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_value(item, name, feature)


def _add_value(value: Any, name: str, feature: feature_pb2.Feature) -> None:
    if isinstance(value, bool):
        _values(feature, "int64_list", name).append(int(value))
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise _invalid(f"Feature: {name} has an integer outside int64's range. Only int64 is supported.")
        _values(feature, "int64_list", name).append(value)
    elif isinstance(value, float):
        _values(feature, "float_list", name).append(value)
    elif isinstance(value, str):
        try:
            _values(feature, "bytes_list", name).append(value.encode())
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but not text
            raise _invalid(f"Feature: {name} holds a string that is not valid Unicode (a lone surrogate?)") from None
    elif isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            decoded = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Unable to base64 decode the 'b64' value of feature: {name}") from None
        _values(feature, "bytes_list", name).append(decoded)
    else:
        raise _invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")


def _values(feature: feature_pb2.Feature, kind: str, name: str):
    present = feature.WhichOneof("kind")
    if present not in (None, kind):
        raise _invalid(f"Unexpected element type in feature: {name} expecting type: {present.split('_')[0]}")
    return getattr(feature, kind).value


def _json_type(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "bool"), ((int, float), "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def result_to_json(result: classification_pb2.ClassificationResult) -> dict[str, Any]:
    return {"results": [[[entry.label, entry.score] for entry in classifications.classes]
                        for classifications in result.classifications]}
