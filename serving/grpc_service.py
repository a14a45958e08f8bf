"""tensorflow.serving.PredictionService and ModelService over gRPC, with the official servicer bases.

The servicers are coroutines for a `grpc.aio` server: one event loop does the protocol work for every call,
instead of a pool of threads that take turns at the GIL. Nothing here blocks the loop for long: Predict awaits
the batcher (or a thread pool without batching); the metadata and status calls only read.
"""

import inspect

import grpc
from google.protobuf import message, message_factory
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from serving.errors import ServingError
from serving.models import ModelManager, Servable
from serving.predict import Predictor, PredictResult
from serving.tensors import array_from_proto, fill_proto


def version_and_label(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
    """The metadata TF Serving returns under "signature_def": every SignatureDef of the MetaGraph."""
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in servable.signature_defs.items():
        result.signature_def[name].CopyFrom(signature)
    return result


def status_response(manager: ModelManager, name: str,
                    version: int | None) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in manager.model(name).statuses(version):
        entry = response.model_version_status.add(version=status.version)
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
        entry.status.error_code = status.error_code
        entry.status.error_message = status.error_message
    return response


async def _abort(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    await context.abort(error.code, error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    async def Predict(self, request: predict_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        try:
            result = await self._predict(request)
        except ServingError as e:
            code, message = e.code, e.message
        else:
            return self._response(result)
        # The status is set, not raised with context.abort: the AbortError grpc.aio keeps on the call's state
        # leads, through its traceback, to this frame, the context and the request (RPCState -> AbortError ->
        # frames -> RPCState), a cycle only the collector frees (docs/soak.md). With a status that is not OK,
        # grpc.aio sends the status and no message.
        context.set_code(code)
        context.set_details(message)
        return predict_pb2.PredictResponse()

    async def _predict(self, request: predict_pb2.PredictRequest) -> PredictResult:
        version, label = version_and_label(request.model_spec)
        inputs = {name: array_from_proto(proto, name) for name, proto in request.inputs.items()}
        return await self.predictor.predict_async(request.model_spec.name, version, label,
                                                  request.model_spec.signature_name, inputs,
                                                  list(request.output_filter))

    @staticmethod
    def _response(result: PredictResult) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = result.model_name
        spec.version.value = result.version
        spec.signature_name = result.signature_name
        outputs = response.outputs
        for name, value in result.outputs.items():
            fill_proto(outputs[name], value)
        return response

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            return await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Metadata field(s) {fields} not supported: ask for exactly ['signature_def']")
        try:
            version, label = version_and_label(request.model_spec)
            with self.predictor.manager.acquire(request.model_spec.name, version, label) as servable:
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = servable.name
                response.model_spec.version.value = servable.version
                response.metadata["signature_def"].Pack(signature_def_map(servable))
                return response
        except ServingError as e:
            return await _abort(context, e)

    async def Classify(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Classify is not implemented: the model has no classify signature")

    async def Regress(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Regress is not implemented: the model has no regress signature")

    async def MultiInference(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not implemented")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            version, label = version_and_label(request.model_spec)
            if label:
                version = self.manager.model(request.model_spec.name).resolve(label=label).version
            return status_response(self.manager, request.model_spec.name, version)
        except ServingError as e:
            return await _abort(context, e)

    async def HandleReloadConfigRequest(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "HandleReloadConfigRequest is not implemented: restart the server with the new config")


class _Malformed:
    """What the deserializer hands a servicer for bytes that are not the request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parse(request_class):
    def deserialize(data: bytes):
        try:
            return request_class.FromString(data)
        except message.DecodeError as e:  # grpc would answer UNKNOWN and log a traceback for each such call
            return _Malformed(e)
    return deserialize


def _guarded(name: str, behaviour):
    async def call(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"Malformed {name} request: the bytes are not its protobuf message ({request.error})")
        result = behaviour(request, context)  # the servicer bases' UNIMPLEMENTED methods are not coroutines
        return await result if inspect.isawaitable(result) else result
    return call


def _handler(service, servicer) -> grpc.GenericRpcHandler:
    """The generated add_*_to_server, built from the service's descriptor, with a deserializer that turns
    bytes that do not parse into INVALID_ARGUMENT instead of UNKNOWN."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(method.name, getattr(servicer, method.name)), request_deserializer=_parse(request_class),
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def add_services(server: grpc.aio.Server, predictor: Predictor) -> None:
    server.add_generic_rpc_handlers((
        _handler(prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
                 PredictionService(predictor)),
        _handler(model_service_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelService(predictor.manager)),
    ))
