"""grpc.health.v1.Health on the embedded server's gRPC port, over real gRPC: SERVING only while every configured
model has an AVAILABLE version, Watch streams that hear each change, NOT_SERVING as soon as the server stops."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_server_support import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"


def health_stub(server) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))


def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def add_version(model_base_path: Path, base: Path, version: int = 1) -> None:
    """Copies the session's version 1 in as `version`, whole at once: a rename of a directory the server ignores."""
    staging = base / f".tmp-{version}"
    shutil.copytree(model_base_path / "1", staging)
    staging.rename(base / str(version))


@pytest.fixture(scope="module")
def server(serve_module):
    return serve_module()


@pytest.mark.parametrize("service", ["", PREDICTION_SERVICE, "mnist"])
def test_check_is_serving_with_a_loaded_model(server, service):
    assert check(health_stub(server), service) == SERVING


def test_list_names_every_service_with_its_status(server):
    response = health_stub(server).List(health_pb2.HealthListRequest(), timeout=10)
    assert {service: answer.status for service, answer in response.statuses.items()} == dict.fromkeys(
        ["", PREDICTION_SERVICE, "mnist"], SERVING)


def test_check_of_an_unknown_service_is_not_found(server):
    with pytest.raises(grpc.RpcError) as raised:
        check(health_stub(server), "no-such-model")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_of_an_unknown_service_is_service_unknown(server):
    call = health_stub(server).Watch(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=30)
    try:
        assert next(call).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        call.cancel()


@pytest.mark.parametrize("method, streaming", [("/grpc.health.v1.Health/Check", False),
                                               ("/grpc.health.v1.Health/Watch", True),
                                               ("/grpc.health.v1.Health/List", False)])
def test_bytes_that_are_not_the_request_message_are_invalid_argument(server, caplog, method, streaming):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        if streaming:
            call = channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as error:
                next(call(b"\xff\xff\xff", timeout=30))
        else:
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as error:
                call(b"\xff\xff\xff", timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Malformed" in error.value.details()
    # The library's handlers answer UNKNOWN and log "Unexpected [DecodeError] raised by servicer method" each time.
    assert [record.getMessage() for record in caplog.records
            if record.levelno >= logging.ERROR or record.exc_info] == []
    assert check(health_stub(server)) == SERVING


def test_not_serving_until_a_version_arrives_serving_until_it_is_removed(serve, model_base_path, tmp_path):
    base = tmp_path / "mnist"
    base.mkdir()
    running = serve(base, file_system_poll_wait_seconds=0.2)
    stub = health_stub(running)
    # From the first call on: the library's own default for "" would be SERVING.
    assert {service: check(stub, service) for service in ["", PREDICTION_SERVICE, "mnist"]} == dict.fromkeys(
        ["", PREDICTION_SERVICE, "mnist"], NOT_SERVING)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    try:
        assert next(watch).status == NOT_SERVING

        add_version(model_base_path, base)
        assert next(watch).status == SERVING  # the very next message: nothing in between
        assert check(stub, "mnist") == check(stub, PREDICTION_SERVICE) == SERVING

        shutil.rmtree(base / "1")  # the model's only version: unloaded
        assert next(watch).status == NOT_SERVING
        assert check(stub, "mnist") == NOT_SERVING
    finally:
        watch.cancel()


def test_one_model_without_an_available_version_makes_the_server_not_serving(serve, model_base_path, tmp_path):
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n"
                      f"  config {{ name: 'mnist' base_path: '{model_base_path}' model_platform: 'tensorflow' }}\n"
                      f"  config {{ name: 'broken' base_path: '{broken}' model_platform: 'tensorflow' }}\n"
                      "}\n")
    running = serve(model_base_path, model_config_file=str(config), model_base_path="")
    stub = health_stub(running)
    assert check(stub, "mnist") == SERVING
    assert check(stub, "broken") == NOT_SERVING  # its one version failed to load
    assert check(stub, "") == check(stub, PREDICTION_SERVICE) == NOT_SERVING


def test_stopping_turns_watchers_not_serving_before_the_drain(serve):
    running = serve()
    stub = health_stub(running)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    stopper = None
    try:
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=running.stop, kwargs={"grace_seconds": 3})
        stopper.start()
        # Without the hook the stream would stay silent until the grace period ends and then be cancelled.
        assert next(watch).status == NOT_SERVING
        assert stopper.is_alive(), "the status came only after the drain"
    finally:
        watch.cancel()
        if stopper:
            stopper.join(30)
    wait_for(lambda: not stopper.is_alive(), 30, "the server to stop")
