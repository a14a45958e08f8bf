"""tensorflow.serving.PredictionService and ModelService over gRPC, with the official servicer bases.

The servicers are coroutines for a `grpc.aio` server: one event loop does the protocol work for every call,
instead of a pool of threads that take turns at the GIL. Nothing here blocks the loop for long: Predict awaits
the batcher (or a thread pool without batching); the metadata and status calls only read. With the access log
on (serving/access_log.py), every call of these two services writes its line; the health service's do not.
"""

import asyncio
import inspect
import logging

import grpc
from google.protobuf import message_factory
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from serving import classify
from serving.access_log import AccessLog, note
from serving.errors import ServingError, parse_request, reject_malformed
from serving.health import ModelHealth, add_health_service
from serving.models import ModelManager
from serving.predict import Predictor, PredictResult
from serving.status import SIGNATURE_DEF_FIELD, model_metadata, model_status
from serving.tensors import array_from_proto, fill_proto

log = logging.getLogger(__name__)


def version_and_label(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


async def _abort(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    await context.abort(error.code, error.message)


def _refuse(context: grpc.aio.ServicerContext, error: ServingError, response):
    """Sets the status instead of raising it with context.abort, for the calls that carry images: the
    AbortError grpc.aio keeps on the call's state leads, through its traceback, to the handler's frame, the
    context and the request (RPCState -> AbortError -> frames -> RPCState), a cycle only the collector frees
    (docs/soak.md). With a status that is not OK, grpc.aio sends the status and not the (empty) response."""
    context.set_code(error.code)
    context.set_details(error.message)
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    async def Predict(self, request: predict_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        try:
            return self._response(await self._predict(request))
        except ServingError as e:
            return _refuse(context, e, predict_pb2.PredictResponse())

    async def _predict(self, request: predict_pb2.PredictRequest) -> PredictResult:
        version, label = version_and_label(request.model_spec)
        inputs = {name: array_from_proto(proto, name) for name, proto in request.inputs.items()}
        return await self.predictor.predict_async(request.model_spec.name, version, label,
                                                  request.model_spec.signature_name, lambda servable, signature: inputs,
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
        if fields != [SIGNATURE_DEF_FIELD]:
            return await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field(s) {fields} not supported: "
                                                                         f"ask for exactly ['{SIGNATURE_DEF_FIELD}']")
        try:
            version, label = version_and_label(request.model_spec)
            served, signatures = model_metadata(self.predictor.manager, request.model_spec.name, version, label)
        except ServingError as e:
            return await _abort(context, e)
        note(version=served)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = served
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest,
                       context: grpc.aio.ServicerContext) -> classification_pb2.ClassificationResponse:
        spec = request.model_spec
        try:
            result = await self.predictor.predict_async(
                spec.name, *version_and_label(spec), spec.signature_name,
                lambda servable, signature: classify.classification_inputs(servable, signature, request.input),
                method=classify.CLASSIFY)
            response = classification_pb2.ClassificationResponse(
                result=classify.classification_result(result.outputs, classify.example_count(request.input)))
        except ServingError as e:
            return _refuse(context, e, classification_pb2.ClassificationResponse())
        response.model_spec.name = result.model_name
        response.model_spec.version.value = result.version
        response.model_spec.signature_name = result.signature_name
        return response

    async def Regress(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Regress is not implemented: the model has no regress signature")

    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest,
                             context: grpc.aio.ServicerContext) -> inference_pb2.MultiInferenceResponse:
        """The version is chosen by the first task's model spec, as TF Serving chooses it."""
        if not request.tasks:
            return await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                       "MultiInferenceRequest has no tasks: give at least one")
        spec = request.tasks[0].model_spec
        try:
            version, outputs = await self.predictor.infer_async(
                spec.name, *version_and_label(spec), lambda servable: classify.multi_inference_plan(request, servable),
                method=classify.MULTI_INFERENCE)
            return classify.multi_inference_response(request, version, outputs)
        except ServingError as e:
            return _refuse(context, e, inference_pb2.MultiInferenceResponse())


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            return model_status(self.manager, request.model_spec.name, *version_and_label(request.model_spec))
        except ServingError as e:
            return await _abort(context, e)

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest,
                                        context: grpc.aio.ServicerContext) -> model_management_pb2.ReloadConfigResponse:
        """The models of request.config served from now on (ModelManager.reload), on a thread of the loop's
        default executor: new models load while requests go on being served."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.manager.reload, request.config)
        except ServingError as e:
            log.error("ReloadConfig failed: %s", e.message)
            return await _abort(context, e)
        return model_management_pb2.ReloadConfigResponse()  # its status: OK


def _guarded(name: str, behaviour, access_log: AccessLog):
    async def call(request, context):
        await reject_malformed(name, request, context)
        result = behaviour(request, context)  # the servicer bases' UNIMPLEMENTED methods are not coroutines
        return await result if inspect.isawaitable(result) else result

    async def logged(request, context):
        spec = getattr(request, "model_spec", None)  # MultiInference names its models in its tasks: not logged
        record = access_log.begin("grpc", name, context.peer(), spec.name if spec is not None else None)
        failed = None
        try:
            return await call(request, context)
        except asyncio.CancelledError:  # the client left or its deadline passed
            failed = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:  # context.abort: the code is on the context
            raise
        except Exception:  # grpc.aio answers UNKNOWN for an exception of ours
            failed = grpc.StatusCode.UNKNOWN
            raise
        finally:
            access_log.end(record, (failed or context.code() or grpc.StatusCode.OK).name)

    return logged if access_log.enabled else call


def _handler(service, servicer, access_log: AccessLog) -> grpc.GenericRpcHandler:
    """The generated add_*_to_server, built from the service's descriptor, with a deserializer that turns
    bytes that do not parse into INVALID_ARGUMENT instead of UNKNOWN, and each call's access-log line."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(method.name, getattr(servicer, method.name), access_log),
            request_deserializer=parse_request(request_class), response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def add_services(server: grpc.aio.Server, predictor: Predictor) -> ModelHealth:
    """Registers every service; returns the health service, which the server tells when it starts to stop."""
    server.add_generic_rpc_handlers((
        _handler(prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
                 PredictionService(predictor), predictor.access_log),
        _handler(model_service_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelService(predictor.manager),
                 predictor.access_log),
    ))
    return add_health_service(server, predictor.manager)
