"""Model version management: a new version switched in under load, a broken one ignored, a removed one unloaded,
and the version policies of a model config file."""

from __future__ import annotations

import base64
import shutil
import threading

import grpc
import pytest

from tests.test_server_support import (
    copy_model_base,
    model_states,
    predict_request,
    prediction_stub,
    rest,
    wait_for,
)


@pytest.fixture(scope="module")
def base(model_base_path, tmp_path_factory):
    return copy_model_base(model_base_path, tmp_path_factory.mktemp("versions") / "mnist")


@pytest.fixture(scope="module")
def server(serve_module, base):
    return serve_module(base, file_system_poll_wait_seconds=0.2)


def served_version(stub, image: bytes, version: int | None = None) -> int:
    return stub.Predict(predict_request([image], version=version), timeout=30).model_spec.version.value


def test_new_version_switches_in_under_load_without_failed_requests(server, base, mnist_png_bytes):
    stub = prediction_stub(server)
    image = mnist_png_bytes[0][0]
    encoded = base64.b64encode(image).decode()
    seen: list[int] = []  # in completion order across threads
    per_thread: dict[int, list[int]] = {i: [] for i in range(4)}  # each in its own request order
    failures: list[str] = []
    stop = threading.Event()

    def hammer(use_rest: bool, mine: list[int]) -> None:
        while not stop.is_set() and len(seen) < 5000:
            try:
                if use_rest:
                    status, body = rest(server, "/v1/models/mnist:predict", {"instances": [{"b64": encoded}]})
                    if status != 200:
                        failures.append(f"REST {status}: {body}")
                else:
                    version = served_version(stub, image)
                    mine.append(version)
                    seen.append(version)
            except grpc.RpcError as e:
                failures.append(f"gRPC {e.code()}: {e.details()}")

    threads = [threading.Thread(target=hammer, args=(i == 0, per_thread[i])) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(seen) > 10, what="traffic on version 1")
        staging = base / ".tmp-2"  # not a version: the server must ignore it while it is being written
        shutil.copytree(base / "1", staging)
        staging.rename(base / "2")
        wait_for(lambda: seen and seen[-1] == 2, what="version 2 to be served")
        count = len(seen)
        wait_for(lambda: len(seen) > count + 10, what="more traffic on version 2")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert seen[0] == 1 and seen[-1] == 2
    for versions in per_thread.values():  # a request that started after one saw 2 never gets 1 again
        if 2 in versions:
            assert set(versions[versions.index(2):]) == {2}
    wait_for(lambda: model_states(server).get(1, ("",))[0] == "END", what="version 1 to be unloaded")
    assert model_states(server)[2] == ("AVAILABLE", "")


def test_broken_new_version_keeps_the_old_one_serving(server, base, mnist_png_bytes):
    stub = prediction_stub(server)
    image = mnist_png_bytes[0][0]
    wait_for(lambda: served_version(stub, image) == 2, what="version 2 from the previous test")
    broken = base / ".tmp-3"
    shutil.copytree(base / "2", broken)
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    broken.rename(base / "3")
    wait_for(lambda: model_states(server).get(3, ("",))[0] == "END", what="version 3 to fail")
    message = model_states(server)[3][1]
    assert "version 3" in message
    assert served_version(stub, image) == 2
    assert model_states(server)[2] == ("AVAILABLE", "")
    status, body = rest(server, "/v1/models/mnist/versions/3")
    assert status == 200 and body["model_version_status"][0]["status"]["error_code"] != "OK"
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request([image], version=3), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_removed_version_is_unloaded(server, base, mnist_png_bytes):
    stub = prediction_stub(server)
    image = mnist_png_bytes[0][0]
    shutil.rmtree(base / "3")
    shutil.rmtree(base / "2")  # 1 is still on disk: latest policy goes back to it
    wait_for(lambda: model_states(server).get(2, ("",))[0] == "END", what="version 2 to be unloaded")
    wait_for(lambda: served_version(stub, image) == 1, what="version 1 to be served again")
    request = predict_request([image], version=2)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_version_whose_variables_arrive_late_is_loaded_by_a_retry(model_base_path, tmp_path, serve,
                                                                     mnist_png_bytes):
    """Copying a version into place: the poll saw its directory and saved_model.pb before variables/ was
    complete. Nothing in the version directory's own mtime or its saved_model.pb changes when the variables
    arrive, so only a retry loads it (TF Serving: --max_num_load_retries, --load_retry_interval_micros)."""
    base = tmp_path / "mnist"
    base.mkdir()
    shutil.copytree(model_base_path / "1", base / "1", ignore=shutil.ignore_patterns("variables"))
    (base / "1" / "variables").mkdir()
    running = serve(base, file_system_poll_wait_seconds=0.1, max_num_load_retries=50,
                    load_retry_interval_micros=300_000)
    wait_for(lambda: model_states(running).get(1, ("",))[0] == "END", what="the incomplete version to fail")
    message = model_states(running)[1][1]
    assert str(tmp_path) not in message and "version 1" in message  # no server paths for clients
    for item in (model_base_path / "1" / "variables").iterdir():
        shutil.copy2(item, base / "1" / "variables" / item.name)
    wait_for(lambda: model_states(running).get(1, ("",))[0] == "AVAILABLE", what="a retry to load it")
    assert served_version(prediction_stub(running), mnist_png_bytes[0][0]) == 1


def test_only_ascii_digit_directories_are_versions_to_the_server_and_the_trainer(tmp_path):
    from serving.models import scan_versions
    from training import export

    for name in ("1", "12", "²", "٣", "1a", "v2"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert sorted(scan_versions(tmp_path)) == export.versions(tmp_path) == [1, 12]


POLICY_CONFIG = """
model_config_list {{
  config {{
    name: "mnist"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    model_version_policy {{ {policy} }}
  }}
}}
"""


@pytest.mark.parametrize("policy, served", [("specific { versions: 1 }", [1]), ("all {}", [1, 2])],
                         ids=["specific", "all"])
def test_a_version_policy_serves_the_versions_it_names(copy_base, serve, tmp_path, mnist_png_bytes, policy,
                                                       served):
    """Versions 1 and 2 on disk; the latest policy (the default) would serve only 2."""
    base = copy_base()
    shutil.copytree(base / "1", base / "2")
    config = tmp_path / "models.config"
    config.write_text(POLICY_CONFIG.format(base_path=base, policy=policy))
    running = serve(base, model_base_path="", model_config_file=str(config))
    assert model_states(running) == dict.fromkeys(served, ("AVAILABLE", ""))
    stub = prediction_stub(running)
    image = mnist_png_bytes[0][0]
    for version in (1, 2):
        if version in served:
            assert served_version(stub, image, version) == version
            assert rest(running, f"/v1/models/mnist/versions/{version}")[0] == 200
        else:
            with pytest.raises(grpc.RpcError) as error:
                served_version(stub, image, version)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert rest(running, f"/v1/models/mnist/versions/{version}:predict",
                        {"instances": [{"b64": base64.b64encode(image).decode()}]})[0] == 404
    assert served_version(stub, image) == max(served)  # no version asked: the newest of those served
