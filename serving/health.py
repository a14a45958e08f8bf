"""gRPC's standard health service, grpc.health.v1.Health, on the gRPC port: SERVING only while every
configured model has an AVAILABLE version.

TF Serving has no health service (its users call GetModelStatus or GetModelMetadata); the embedded server adds
grpcio-health-checking's servicer beside the same model status on REST (GET /v1/models/<name>). The services
a client can name:
- "" (the server as a whole) and "tensorflow.serving.PredictionService": every model has a version to predict
  with; one model without (none loaded yet, all unloaded or failed) makes both NOT_SERVING.
- each model's name: that model has an AVAILABLE version.
Other names: Check answers NOT_FOUND and Watch SERVICE_UNKNOWN, as the library does. List answers them all
(the library leaves List UNIMPLEMENTED, with a traceback in the log for each call). The statuses are read from
the model manager every POLL_SECONDS on the gRPC loop (the manager has no hook to subscribe to), and are
NOT_SERVING for good once the server starts to stop: Watch streams hear it before the drain begins.

The service is registered with this module's own handlers, not the library's add_HealthServicer_to_server: bytes
that are not the request message get INVALID_ARGUMENT, as on the other services (serving/grpc_service.py),
where the library's deserializer would have grpc answer UNKNOWN and log a traceback for each such call.
"""

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2
from tensorflow_serving.apis import prediction_service_pb2

from serving.errors import parse_request, reject_malformed
from serving.models import ModelManager

log = logging.getLogger("serving")

POLL_SECONDS = 1.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def serving_statuses(manager: ModelManager) -> dict[str, int]:
    """Service name -> HealthCheckResponse status, from the versions' states that GetModelStatus reports."""
    models = {name: SERVING if any(s.state == "AVAILABLE" for s in model.statuses()) else NOT_SERVING
              for name, model in manager.models.items()}
    overall = SERVING if all(status == SERVING for status in models.values()) else NOT_SERVING
    return {health.OVERALL_HEALTH: overall, PREDICTION_SERVICE: overall, **models}


class ModelHealth(health.aio.HealthServicer):
    """The library's asyncio health servicer, kept in step with the model manager by a task on the gRPC loop."""

    def __init__(self, manager: ModelManager) -> None:
        super().__init__()
        self.manager = manager
        self._statuses: dict[str, int] = {}  # as last set
        self._task: asyncio.Task | None = None

    async def _update(self) -> None:
        statuses = serving_statuses(self.manager)
        # A model no longer configured (a config reload) has no version to serve; the library cannot forget it.
        statuses.update(dict.fromkeys(self._statuses.keys() - statuses.keys(), NOT_SERVING))
        for service, status in statuses.items():
            if self._statuses.get(service) != status:
                await self.set(service, status)
        self._statuses = statuses

    async def _follow(self) -> None:
        while True:
            try:
                await self._update()
            except Exception:  # a status read that failed: keep the last statuses, try again next time
                log.exception("Updating the gRPC health statuses failed")
            await asyncio.sleep(POLL_SECONDS)

    def start(self) -> None:
        """Starts following the manager; call on the gRPC loop before the server starts, so that the first
        statuses are set before the first call is served (the library would answer SERVING for "" until then)."""
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="grpc-health")

    async def shutdown(self) -> None:
        """NOT_SERVING for every service from now on (the library ignores later updates)."""
        if self._task:
            self._task.cancel()
        await self.enter_graceful_shutdown()

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            service: health_pb2.HealthCheckResponse(status=status) for service, status in self._server_status.items()})


def _handler(servicer: ModelHealth) -> grpc.GenericRpcHandler:
    """The library's add_HealthServicer_to_server, with deserializers that turn bytes that do not parse into
    INVALID_ARGUMENT instead of UNKNOWN."""

    async def check(request, context):
        await reject_malformed("Check", request, context)
        return await servicer.Check(request, context)

    async def watch(request, context):  # writes its stream with context.write, as the library's Watch does
        await reject_malformed("Watch", request, context)
        await servicer.Watch(request, context)

    async def list_(request, context):
        await reject_malformed("List", request, context)
        return await servicer.List(request, context)

    check_request = parse_request(health_pb2.HealthCheckRequest)
    check_response = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=check_request, response_serializer=check_response),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch, request_deserializer=check_request, response_serializer=check_response),
        "List": grpc.unary_unary_rpc_method_handler(
            list_, request_deserializer=parse_request(health_pb2.HealthListRequest),
            response_serializer=health_pb2.HealthListResponse.SerializeToString),
    })


def add_health_service(server: grpc.aio.Server, manager: ModelManager) -> ModelHealth:
    """Registers grpc.health.v1.Health on server, following manager. The server's stop awaits the returned
    servicer's shutdown() before it drains, so Watch streams hear NOT_SERVING first."""
    model_health = ModelHealth(manager)
    server.add_generic_rpc_handlers((_handler(model_health),))
    model_health.start()
    return model_health
