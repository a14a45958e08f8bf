"""TF Serving's text-format config files: ModelServerConfig, BatchingParameters, MonitoringConfig, SSLConfig.

The tensorflow-serving-api wheel ships ModelServerConfig but not monitoring_config.proto,
session_bundle_config.proto nor ssl_config.proto, so the messages we need from those are rebuilt here from the
upstream definitions (same package, names and field numbers) in a private descriptor pool: a file written for
tensorflow_model_server parses the same here.
"""

from pathlib import Path
from typing import TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

ModelServerConfig = model_server_config_pb2.ModelServerConfig

_F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, ftype: int, type_name: str = "", repeated: bool = False) -> _F:
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    proto = _F(name=name, number=number, type=ftype, label=label)
    if type_name:
        proto.type_name = type_name
    return proto


def _build_messages() -> tuple[type[message.Message], type[message.Message], type[message.Message]]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    monitoring = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/monitoring_config.proto", package="tensorflow.serving", syntax="proto3")
    prometheus = monitoring.message_type.add(name="PrometheusConfig")
    prometheus.field.extend([_field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)])
    monitoring.message_type.add(name="MonitoringConfig").field.extend(
        [_field("prometheus_config", 1, _F.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")])
    pool.Add(monitoring)

    batching = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    int64 = ".google.protobuf.Int64Value"
    batching.message_type.add(name="BatchingParameters").field.extend([
        _field("max_batch_size", 1, _F.TYPE_MESSAGE, int64),
        _field("batch_timeout_micros", 2, _F.TYPE_MESSAGE, int64),
        _field("max_enqueued_batches", 3, _F.TYPE_MESSAGE, int64),
        _field("num_batch_threads", 4, _F.TYPE_MESSAGE, int64),
        _field("thread_pool_name", 5, _F.TYPE_MESSAGE, ".google.protobuf.StringValue"),
        _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
        _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
    ])
    pool.Add(batching)

    # --ssl_config_file: the PEM texts themselves (not paths), as tensorflow_model_server reads them.
    ssl = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/ssl_config.proto", package="tensorflow.serving", syntax="proto3")
    ssl.message_type.add(name="SSLConfig").field.extend([
        _field("server_key", 1, _F.TYPE_STRING),
        _field("server_cert", 2, _F.TYPE_STRING),
        _field("custom_ca", 3, _F.TYPE_STRING),
        _field("client_verify", 4, _F.TYPE_BOOL),
    ])
    pool.Add(ssl)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")),
            get(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")),
            get(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig")))


MonitoringConfig, BatchingParameters, SSLConfig = _build_messages()

M = TypeVar("M", bound=message.Message)


def read_text_proto(path: str | Path, message_class: type[M]) -> M:
    """Parse a text-format config file; a syntax error names the file and the line."""
    parsed = message_class()
    try:
        text_format.Parse(Path(path).read_text(), parsed)
    except text_format.ParseError as e:
        raise ValueError(f"{path}: {e}") from e
    return parsed
