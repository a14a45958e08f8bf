"""Models added, removed and re-labelled without a restart: ModelService/HandleReloadConfigRequest and
--model_config_file_poll_wait_seconds, against the real embedded server over real gRPC and REST."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_management_pb2

from tests.test_server_support import model_states, model_stub, predict_request, prediction_stub, rest, wait_for


def config_text(models: dict[str, Path], labels: dict[str, dict[str, int]] | None = None,
                policy: str = " model_version_policy { all {} }") -> str:
    """A ModelServerConfig's text: every version of each model served unless `policy` says otherwise."""
    entries = []
    for name, base_path in models.items():
        label_lines = "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).get(name,
                                                                                                          {}).items())
        entries.append(f'config {{ name: "{name}" base_path: "{base_path}" model_platform: "tensorflow"{policy}'
                       f"{label_lines} }}")
    return "model_config_list { " + " ".join(entries) + " }"


def reload_request(text: str) -> model_management_pb2.ReloadConfigRequest:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return request


def served_version(server, model: str = "mnist", label: str = "") -> int:
    request = predict_request([PNG], model=model)
    if label:
        request.model_spec.version_label = label
    return prediction_stub(server).Predict(request, timeout=30).model_spec.version.value


PNG: bytes = b""


@pytest.fixture(autouse=True)
def _png(mnist_png_bytes):
    global PNG
    PNG = mnist_png_bytes[0][0]


@pytest.fixture
def two_versions(copy_base) -> Path:
    """A base path with versions 1 and 2 (the same model twice)."""
    base = copy_base("mnist")
    shutil.copytree(base / "1", base / "2")
    return base


@pytest.fixture
def server(serve, two_versions, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(config_text({"mnist": two_versions}))
    return serve(model_base_path="", model_config_file=str(config), file_system_poll_wait_seconds=0)


@pytest.fixture(scope="module")
def steady_server(serve_module, model_base_path, tmp_path_factory):
    """One server for the tests of reloads that must change nothing: versions 1 and 2, every version served."""
    from tests.test_server_support import copy_model_base

    base = copy_model_base(model_base_path, tmp_path_factory.mktemp("steady") / "mnist")
    shutil.copytree(base / "1", base / "2")
    config = base.parent / "models.config"
    config.write_text(config_text({"mnist": base}))
    return serve_module(model_base_path="", model_config_file=str(config), file_system_poll_wait_seconds=0)


def reload(server, text: str):
    return model_stub(server).HandleReloadConfigRequest(reload_request(text), timeout=120)


def test_a_model_added_by_a_reload_serves_once_the_reload_returns(server, two_versions, copy_base):
    other = copy_base("other")

    response = reload(server, config_text({"mnist": two_versions, "other": other}))

    assert response.status.error_code == 0
    assert served_version(server, "other") == 1
    assert served_version(server, "mnist") == 2  # untouched: its versions stayed loaded
    assert model_states(server, "other") == {1: ("AVAILABLE", "")}
    status, body = rest(server, "/v1/models/other")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


def test_a_model_removed_by_a_reload_finishes_its_requests_in_flight_then_is_gone(server, two_versions, copy_base):
    other = copy_base("other")
    reload(server, config_text({"mnist": two_versions, "other": other}))
    many = [PNG] * 600  # long enough to be running when the reload starts
    answers = {}

    def ask() -> None:
        try:
            answers["response"] = prediction_stub(server).Predict(predict_request(many, model="other"), timeout=120)
        except grpc.RpcError as e:
            answers["error"] = e

    asker = threading.Thread(target=ask)
    asker.start()
    servable = server.manager.models["other"]._servables[1]
    wait_for(lambda: servable._inflight > 0 or "response" in answers, what="the request to be running")
    reload(server, config_text({"mnist": two_versions}))
    asker.join(120)

    assert "error" not in answers, answers.get("error")
    assert tf.make_ndarray(answers["response"].outputs["digit"]).shape == (600,)
    with pytest.raises(grpc.RpcError) as caught:
        served_version(server, "other")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert served_version(server, "mnist") == 2
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10).status
             == health_pb2.HealthCheckResponse.NOT_SERVING, what="the removed model to be NOT_SERVING")


def test_a_reload_moves_a_label_and_refuses_one_on_a_version_that_is_not_available(server, two_versions):
    reload(server, config_text({"mnist": two_versions}, labels={"mnist": {"stable": 1}}))
    assert served_version(server, "mnist", label="stable") == 1

    reload(server, config_text({"mnist": two_versions}, labels={"mnist": {"stable": 2}}))
    assert served_version(server, "mnist", label="stable") == 2

    with pytest.raises(grpc.RpcError) as caught:
        reload(server, config_text({"mnist": two_versions}, labels={"mnist": {"stable": 7}}))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == ("Request to assign label to version 7 of model mnist, which is not currently "
                                      "available for inference")
    assert served_version(server, "mnist", label="stable") == 2  # a refused config changes nothing


def test_a_reload_to_a_policy_of_one_version_unloads_the_other(server, two_versions):
    assert model_states(server) == {1: ("AVAILABLE", ""), 2: ("AVAILABLE", "")}
    reload(server, config_text({"mnist": two_versions}, policy=" model_version_policy { specific { versions: 1 } }"))
    assert model_states(server)[2][0] == "END"
    assert served_version(server) == 1


@pytest.mark.parametrize("text, code, message", [
    ("model_config_list { config { name: 'mnist' base_path: '/x' } config { name: 'mnist' base_path: '/y' } }",
     grpc.StatusCode.INVALID_ARGUMENT, "Illegal to list model mnist multiple times in config list"),
    ("model_config_list { config { name: 'mnist' base_path: '/x' model_platform: 'pytorch' } }",
     grpc.StatusCode.INVALID_ARGUMENT, "Model mnist requests unsupported platform pytorch"),
    ("model_config_list { config { name: 'mnist' } }", grpc.StatusCode.INVALID_ARGUMENT, "absolute path"),
    ("custom_model_config { }", grpc.StatusCode.FAILED_PRECONDITION, "only legal to transition from one "
                                                                      "ModelConfigList to another"),
])
def test_configs_tf_serving_refuses_are_refused_and_change_nothing(steady_server, text, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        reload(steady_server, text)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert served_version(steady_server) == 2


def test_an_empty_config_changes_nothing(steady_server):
    assert reload(steady_server, "").status.error_code == 0
    assert served_version(steady_server) == 2


def test_a_new_model_with_no_version_is_unknown_and_stays_configured(server, two_versions, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(grpc.RpcError) as caught:
        reload(server, config_text({"mnist": two_versions, "empty": empty}))
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "1 model(s) did not become available" in caught.value.details()
    assert "empty" in caught.value.details()
    assert served_version(server) == 2
    (empty / "1").symlink_to(two_versions / "1", target_is_directory=True)
    reload(server, config_text({"mnist": two_versions, "empty": empty}))  # the same config, polled again
    assert served_version(server, "empty") == 1


def test_the_config_file_is_read_again_and_its_changes_served(serve, two_versions, copy_base, tmp_path, caplog):
    config = tmp_path / "models.config"
    config.write_text(config_text({"mnist": two_versions}))
    server = serve(model_base_path="", model_config_file=str(config), model_config_file_poll_wait_seconds=0.2)
    other = copy_base("other")

    config.write_text(config_text({"mnist": two_versions, "other": other}))
    wait_for(lambda: "other" in server.manager.models and server.manager.models["other"].available(),
             what="the model added to the file to load")
    assert served_version(server, "other") == 1

    config.write_text("model_config_list { config { name: ")  # half written: reported, nothing changes
    wait_for(lambda: "Reloading the model config failed" in caplog.text, what="the unreadable file to be reported")
    assert served_version(server, "mnist") == 2 and served_version(server, "other") == 1

    config.write_text(config_text({"other": other}))
    wait_for(lambda: "mnist" not in server.manager.models, what="the model removed from the file to go")
    assert served_version(server, "other") == 1
