"""Tensors in TF Serving's REST JSON (api_rest.md, util/json_tensor.cc) and in TensorProtos.

Row format: {"instances": [...]}, one entry per example, an object keyed by input name or (one input) the
bare value; answered with {"predictions": [...]}, a bare value per example for one output, else an object
keyed by output name. Columnar: {"inputs": {...}} or (one input) {"inputs": value}; answered with
{"outputs": ...} in the same way. Binary strings travel as {"b64": "..."}; string outputs whose name ends
in "_bytes" are sent back that way.
"""

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import ServingError

MAX_RANK = 32  # numpy holds at most 64 dimensions; no signature of ours has more than 4


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode_strings(value: Any, name: str) -> Any:
    if _is_b64(value):
        if not isinstance(value["b64"], str):
            raise _invalid(f"'b64' value of input '{name}' must be a string")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Unable to base64 decode the 'b64' value of input '{name}'") from None
    if isinstance(value, list):
        return [_decode_strings(item, name) for item in value]
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800") is valid JSON but not text
            raise _invalid(f"input '{name}' holds a string that is not valid Unicode (a lone surrogate?)") from None
    raise _invalid(f"input '{name}' expects strings (or {{\"b64\": ...}} objects), got {type(value).__name__}")


def json_to_array(value: Any, spec: tf.TensorSpec, name: str) -> np.ndarray:
    if spec.dtype == tf.string:
        decoded = _decode_strings(value, name)
        shape = _nested_shape(decoded, name)
        if len(shape) > MAX_RANK:
            raise _invalid(f"input '{name}' is nested {len(shape)} lists deep; at most {MAX_RANK} dimensions")
        array = np.empty(shape, dtype=object)  # never padded to the longest string
        for index in np.ndindex(array.shape):
            item = decoded
            for i in index:
                item = item[i]
            array[index] = item
        return array
    if _contains(value, lambda v: isinstance(v, (dict, str))):
        raise _invalid(f"input '{name}' expects {spec.dtype.name} numbers, got strings or objects")
    try:
        return np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise _invalid(f"input '{name}' could not be read as a {spec.dtype.name} tensor: {e}") from None


def _nested_shape(value: Any, name: str) -> tuple[int, ...]:
    """The shape of nested lists of strings, without asking numpy (np.shape would build a fixed-width array
    padded to the longest string: one 200 KB string among 2,000 empty ones cost 400 MB)."""
    if not isinstance(value, list):
        return ()
    shapes = {_nested_shape(item, name) for item in value}
    if len(shapes) > 1:
        raise _invalid(f"input '{name}' is ragged: all lists on one level must have the same length")
    return (len(value), *(shapes.pop() if shapes else ()))


def _contains(value: Any, test) -> bool:
    if isinstance(value, list):
        return any(_contains(v, test) for v in value)
    return test(value)


def inputs_from_json(body: Any, specs: dict[str, tf.TensorSpec]) -> tuple[dict[str, np.ndarray], bool]:
    """Returns the input arrays and whether the request used the row ("instances") format."""
    if not isinstance(body, dict):
        raise _invalid("Request body must be a JSON object with \"instances\" or \"inputs\"")
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("Request must have exactly one of \"instances\" (row format) or \"inputs\" (columnar format)")
    if "inputs" in body:
        value = body["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            named = value
        elif len(specs) == 1:
            named = {next(iter(specs)): value}
        else:
            raise _invalid(f"\"inputs\" must be an object keyed by input name: the signature has {sorted(specs)}")
        return _arrays(named, specs), False
    instances = body["instances"]
    if not isinstance(instances, list):
        raise _invalid("\"instances\" must be a list")
    if not instances:  # TF Serving's rule: a row-format answer of no rows has no batch size to write
        raise _invalid("No values in 'instances' array: send at least one instance (or \"inputs\" of no images)")
    if instances and all(isinstance(i, dict) and not _is_b64(i) for i in instances):
        names = set(instances[0])
        if any(set(i) != names for i in instances):
            raise _invalid("Every instance must have the same named inputs")
        named = {name: [i[name] for i in instances] for name in names}
    elif len(specs) == 1:
        named = {next(iter(specs)): instances}
    else:
        raise _invalid(f"Instances must be objects keyed by input name: the signature has {sorted(specs)}")
    return _arrays(named, specs), True


def check_input_names(specs: Mapping[str, tf.TensorSpec], names: Iterable[str]) -> None:
    """The request's input names against the signature's, with TF Serving's messages: an unknown name first,
    then a missing one. Servable.check_inputs asks it for every request; REST JSON asks it first, since each
    value is read as the dtype of the input it names."""
    names = set(names)
    unknown, missing = sorted(names - set(specs)), sorted(set(specs) - names)
    if unknown:
        raise _invalid(f"input tensor alias not found in signature: {', '.join(unknown)}. "
                       f"Inputs expected to be in the set {{{', '.join(sorted(specs))}}}.")
    if missing:
        raise _invalid(f"Missing input tensor alias(es): {', '.join(missing)}")


def _arrays(named: dict[str, Any], specs: dict[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    check_input_names(specs, named)
    return {name: json_to_array(value, specs[name], name) for name, value in named.items()}


def _to_json(array: np.ndarray, name: str) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        as_b64 = name.endswith("_bytes")

        def convert(item: Any) -> Any:
            if isinstance(item, list):
                return [convert(i) for i in item]
            if as_b64:
                return {"b64": base64.b64encode(item).decode()}
            return item.decode("utf-8", errors="replace")
        return convert(array.tolist())
    return array.tolist()


def outputs_to_json(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    if not row_format:
        if len(outputs) == 1:
            (name, value), = outputs.items()
            return {"outputs": _to_json(value, name)}
        return {"outputs": {name: _to_json(value, name) for name, value in outputs.items()}}
    sizes = {value.shape[0] if value.ndim else None for value in outputs.values()}
    if len(sizes) != 1 or None in sizes:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Outputs do not share a batch dimension: use the columnar (\"inputs\") format")
    if len(outputs) == 1:
        (name, value), = outputs.items()
        return {"predictions": _to_json(value, name)}
    columns = {name: _to_json(value, name) for name, value in outputs.items()}
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(sizes.pop())]}


# dtypes whose TensorProto is the raw little-endian bytes in tensor_content, as tf.make_tensor_proto writes them
_CONTENT_DTYPES = {np.dtype(t): tf.as_dtype(t).as_datatype_enum
                   for t in (np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8, np.int16, np.bool_)}
_IS_LITTLE_ENDIAN = np.little_endian


# The repeated field that carries each dtype's values when tensor_content is empty.
# Where a TensorProto carries each dtype's values when not in tensor_content, and how many numbers a value is.
_VALUE_FIELDS = {types_pb2.DT_STRING: "string_val", types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                 types_pb2.DT_INT32: "int_val", types_pb2.DT_UINT8: "int_val", types_pb2.DT_INT16: "int_val",
                 types_pb2.DT_INT8: "int_val", types_pb2.DT_UINT16: "int_val", types_pb2.DT_INT64: "int64_val",
                 types_pb2.DT_BOOL: "bool_val", types_pb2.DT_HALF: "half_val", types_pb2.DT_BFLOAT16: "half_val",
                 types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
                 types_pb2.DT_COMPLEX64: "scomplex_val", types_pb2.DT_COMPLEX128: "dcomplex_val"}
_NUMBERS_PER_VALUE = {types_pb2.DT_COMPLEX64: 2, types_pb2.DT_COMPLEX128: 2}


def _declared_elements(proto: tensor_pb2.TensorProto, name: str) -> int:
    if proto.tensor_shape.unknown_rank:
        raise _invalid(f"input '{name}' declares an unknown rank: give its shape")
    if len(proto.tensor_shape.dim) > MAX_RANK:
        raise _invalid(f"input '{name}' has {len(proto.tensor_shape.dim)} dimensions; at most {MAX_RANK}")
    elements = 1
    for dim in proto.tensor_shape.dim:
        if dim.size < 0:
            raise _invalid(f"input '{name}' declares a dimension of size {dim.size}")
        elements *= dim.size
    return elements


def array_from_proto(proto: tensor_pb2.TensorProto, name: str) -> np.ndarray:
    """The TensorProto as an array, once it is found to carry every value its shape declares, whatever its
    dtype: by TensorFlow's rule a proto with fewer values has its last one repeated to fill the shape, which
    let 39 bytes ask for a million images and 40 bytes of DT_HALF for 200 million values (+382 MB)."""
    field = _VALUE_FIELDS.get(proto.dtype)
    if field is None:
        dtype = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        raise _invalid(f"input '{name}' has dtype {dtype}, which a request cannot carry")
    declared = _declared_elements(proto, name)
    if proto.tensor_content:
        itemsize = 0 if proto.dtype == types_pb2.DT_STRING else tf.as_dtype(proto.dtype).size
        if declared * itemsize != len(proto.tensor_content):
            raise _invalid(f"input '{name}' declares {declared} values in its shape but its tensor_content holds "
                           f"{len(proto.tensor_content)} bytes")
    else:
        carried = len(getattr(proto, field)) // _NUMBERS_PER_VALUE.get(proto.dtype, 1)
        if declared != carried:
            raise _invalid(f"input '{name}' declares {declared} values in its shape but carries {carried}: "
                           f"send every value")
    # Fast path for the common request, a flat list of strings (make_ndarray costs ~50 us more).
    if proto.dtype == types_pb2.DT_STRING and len(proto.tensor_shape.dim) == 1:
        return np.array(proto.string_val, dtype=object)
    try:
        return tf.make_ndarray(proto)
    except Exception as e:
        raise _invalid(f"input '{name}' is not a valid TensorProto: {e}") from None


def fill_proto(proto: tensor_pb2.TensorProto, array: np.ndarray) -> None:
    """Writes what tf.make_tensor_proto would return into an empty TensorProto, in place (a map entry of a
    response: no copy); numeric arrays are written directly (~100 us less each)."""
    enum = _CONTENT_DTYPES.get(array.dtype)
    if enum is None or not _IS_LITTLE_ENDIAN:
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.dtype = enum
    proto.tensor_content = array.tobytes()  # C order, like np.ascontiguousarray(array).tobytes()
    proto.tensor_shape.SetInParent()
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add(size=size)
