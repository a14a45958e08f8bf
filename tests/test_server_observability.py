"""Metrics per model version and per API, and the access log, against a real embedded server over real gRPC and
HTTP on 127.0.0.1 (serving/metrics.py, serving/access_log.py)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
import threading
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2

from serving import access_log
from serving.server import ServerOptions, start_server
from tests.test_server_support import (
    copy_model_base,
    metric_value,
    predict_request,
    prediction_stub,
    rest,
    wait_for,
)

METRICS_PATH = "/monitoring/prometheus/metrics"
FIELDS = {"time", "model", "version", "api", "method", "status", "latency_ms", "batch_size", "client"}
LOOPBACK_PEER = re.compile(r"ipv4:127\.0\.0\.1:\d+")

# Versions 1 and 2 served side by side, so each request can pick the version that answers it.
TWO_VERSIONS = """
model_config_list {{
  config {{
    name: "mnist"
    base_path: "{base_path}"
    model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
  }}
}}
"""


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    return tmp_path_factory.mktemp("access") / "access.log"


@pytest.fixture(scope="module")
def server(serve_module, model_base_path, tmp_path_factory, log_path):
    work = tmp_path_factory.mktemp("observability")
    base = copy_model_base(model_base_path, work / "mnist")
    shutil.copytree(base / "1", base / "2")
    config = work / "models.config"
    config.write_text(TWO_VERSIONS.format(base_path=base))
    return serve_module(model_base_path="", model_config_file=str(config),
                        monitoring_config_file="serving/monitoring.config", access_log_file=str(log_path))


@pytest.fixture(scope="module")
def stub(server):
    return prediction_stub(server)


@pytest.fixture(scope="module")
def images(mnist_png_bytes):
    return [png for png, _ in mnist_png_bytes]


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def scrape(server) -> str:
    status, text = rest(server, METRICS_PATH)
    assert status == 200
    return text


def log_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def new_log_lines(path, before: int, count: int) -> list[dict]:
    """The count lines written after the first `before`, parsed (the writer thread may lag the answers a little)."""
    wait_for(lambda: len(log_lines(path)) >= before + count, timeout=30, what=f"{count} access log lines")
    lines = log_lines(path)
    assert len(lines) == before + count, lines[before:]
    return [json.loads(line) for line in lines[before:]]


def one(lines: list[dict], **fields) -> dict:
    matching = [line for line in lines if all(line[name] == value for name, value in fields.items())]
    assert len(matching) == 1, (fields, lines)
    return matching[0]


def test_metrics_count_each_request_under_its_model_version_and_api(server, stub, images):
    def counts(text: str) -> dict[str, float]:
        series = {
            "grpc v1 OK": ':tensorflow:serving:request_count{model_name="mnist",version="1",api="grpc",status="OK"}',
            "rest v2 OK": ':tensorflow:serving:request_count{model_name="mnist",version="2",api="rest",status="OK"}',
            "rest v2 bad": ':tensorflow:serving:request_count{model_name="mnist",version="2",api="rest",'
                           'status="INVALID_ARGUMENT"}',
            "unknown": ':tensorflow:serving:request_count{model_name="",version="",api="grpc",status="NOT_FOUND"}',
            "latency grpc": ':tensorflow:serving:request_latency_count{model_name="mnist",API="Predict",'
                            'entrypoint="GRPC",status="OK"}',
            "latency rest": ':tensorflow:serving:request_latency_count{model_name="mnist",API="Predict",'
                            'entrypoint="REST",status="OK"}',
            "latency rest bad": ':tensorflow:serving:request_latency_count{model_name="mnist",API="Predict",'
                                'entrypoint="REST",status="INVALID_ARGUMENT"}',
            "runtime v1": ':tensorflow:serving:runtime_latency_count{model_name="mnist",version="1",API="Predict",'
                          'runtime="TF1"}',
            "runtime v2": ':tensorflow:serving:runtime_latency_count{model_name="mnist",version="2",API="Predict",'
                          'runtime="TF1"}',
        }
        return {name: metric_value(text, prefix) for name, prefix in series.items()}

    before = counts(scrape(server))
    response = stub.Predict(predict_request(images[:1], version=1), timeout=30)
    assert response.model_spec.version.value == 1
    status, _ = rest(server, "/v1/models/mnist/versions/2:predict", {"instances": [b64(images[0]), b64(images[1])]})
    assert status == 200
    status, _ = rest(server, "/v1/models/mnist/versions/2:predict", {"instances": [b64(b"not an image")]})
    assert status == 400
    for version in (99, 123456789):  # refused: versions the server never loaded
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(predict_request(images[:1], version=version), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    text = scrape(server)
    after = counts(text)

    assert {name: after[name] - before[name] for name in after} == {
        "grpc v1 OK": 1, "rest v2 OK": 1, "rest v2 bad": 1, "unknown": 2, "latency grpc": 1, "latency rest": 1,
        "latency rest bad": 1, "runtime v1": 1, "runtime v2": 1}
    versions = set(re.findall(r'version="([^"]*)"', text))
    assert versions == {"", "1", "2"}  # only versions the server loaded become label values
    assert "# TYPE :tensorflow:serving:runtime_latency histogram" in text


def test_access_log_has_one_json_line_per_request_and_never_the_image(server, stub, images, log_path):
    before = len(log_lines(log_path))
    started = datetime.now(UTC)
    stub.Predict(predict_request(images[:1], version=1), timeout=30)
    status, _ = rest(server, "/v1/models/mnist/versions/2:predict", {"instances": [b64(images[0]), b64(images[1])]})
    assert status == 200
    status, _ = rest(server, "/v1/models/nope:predict", {"instances": [b64(images[2])]})  # refused
    assert status == 404
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(predict_request(images[3:4], version=99), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "mnist"
    stub.GetModelMetadata(metadata, timeout=30)
    assert rest(server, "/v1/models/mnist")[0] == 200
    lines = new_log_lines(log_path, before, 6)

    assert all(set(line) == FIELDS for line in lines), lines
    assert all(LOOPBACK_PEER.fullmatch(line["client"]) for line in lines), lines
    for line in lines:
        logged = datetime.fromisoformat(line["time"])
        assert logged.utcoffset() == timedelta(0)
        assert started - timedelta(seconds=1) <= logged <= datetime.now(UTC)
        assert 0 < line["latency_ms"] < 60_000
    grpc_predict = one(lines, api="grpc", method="Predict", status="OK")
    assert (grpc_predict["model"], grpc_predict["version"], grpc_predict["batch_size"]) == ("mnist", 1, 1)
    rest_predict = one(lines, api="rest", method="Predict", status=200)
    assert (rest_predict["model"], rest_predict["version"], rest_predict["batch_size"]) == ("mnist", 2, 2)
    unknown = one(lines, api="rest", method="Predict", status=404)
    assert (unknown["model"], unknown["version"], unknown["batch_size"]) == ("nope", None, None)
    missing_version = one(lines, api="grpc", method="Predict", status="NOT_FOUND")
    assert (missing_version["model"], missing_version["version"]) == ("mnist", None)
    served_metadata = one(lines, api="grpc", method="GetModelMetadata")
    assert (served_metadata["status"], served_metadata["version"], served_metadata["batch_size"]) == ("OK", 2, None)
    assert one(lines, api="rest", method="GetModelStatus")["status"] == 200

    text = log_path.read_text(encoding="utf-8")
    for image in images[:4]:
        encoded = base64.b64encode(image).decode()
        assert encoded not in text and encoded[40:80] not in text


def test_concurrent_requests_each_log_their_own_version_and_batch_size(server, stub, images, log_path):
    """The version and batch size are noted on the request being served (a context variable per gRPC task and REST
    thread): under concurrency no request's line gets another's. Version 1 is sent 1 image, version 2 2."""
    before = len(log_lines(log_path))
    calls = [stub.Predict.future(predict_request(images[:version], version=version), timeout=60)
             for version in (1, 2) * 8]
    assert [call.result().model_spec.version.value for call in calls] == [1, 2] * 8
    lines = new_log_lines(log_path, before, 16)
    assert sorted((line["version"], line["batch_size"]) for line in lines) == [(1, 1)] * 8 + [(2, 2)] * 8


def test_a_model_name_stays_inside_its_line_and_is_cut_to_length(server, stub, images, log_path):
    before = len(log_lines(log_path))
    name = 'x"}\n{"model": "injected", "status": "OK"}\n' + "y" * 5000
    request = predict_request(images[:1])
    request.model_spec.name = name
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    (line,) = new_log_lines(log_path, before, 1)
    assert line["status"] == "NOT_FOUND"
    assert line["model"] == f"{name[:1000]}... ({len(name)} characters in all)"


def test_access_log_is_off_by_default(serve, images, tmp_path, monkeypatch, capfd):
    assert ServerOptions().access_log_file == ""
    monkeypatch.chdir(tmp_path)
    server = serve()
    prediction_stub(server).Predict(predict_request(images[:1]), timeout=30)
    assert rest(server, "/v1/models/mnist:predict", {"instances": [b64(images[0])]})[0] == 200
    assert rest(server, "/v1/models/nope:predict", {"instances": [b64(images[0])]})[0] == 404
    server.stop()
    assert list(tmp_path.iterdir()) == []  # no file written
    assert '"method": "Predict"' not in capfd.readouterr().out  # and nothing on stdout


def test_access_log_dash_writes_the_lines_to_stdout(serve, images, capfd):
    server = serve(access_log_file="-")
    prediction_stub(server).Predict(predict_request(images[:1]), timeout=30)
    assert rest(server, "/v1/models/mnist:predict", {"instances": [b64(images[0])]})[0] == 200
    server.stop()  # writes what is queued
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [(line["api"], line["method"], line["status"], line["version"]) for line in lines] == [
        ("grpc", "Predict", "OK", 1), ("rest", "Predict", 200, 1)]


def test_an_access_log_that_cannot_be_written_stops_the_server_at_start(model_base_path, tmp_path):
    options = ServerOptions(model_name="mnist", model_base_path=str(model_base_path), host="127.0.0.1", port=0,
                            rest_api_port=0, access_log_file=str(tmp_path / "no such dir" / "access.log"))
    with pytest.raises(OSError):
        start_server(options)


def test_a_stalled_writer_never_holds_a_request(monkeypatch, caplog):
    """The lines go through a bounded queue to the writer's thread: with stdout stuck, requests still end at once,
    and the lines that find the queue full are dropped and counted."""
    gate = threading.Event()

    class StuckStdout(io.StringIO):
        def write(self, text: str) -> int:
            gate.wait()
            return super().write(text)

    stdout = StuckStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(access_log, "MAX_QUEUED", 5)
    log = access_log.AccessLog("-")

    def requests() -> None:
        for _ in range(50):
            log.end(log.begin("grpc", "Predict", "ipv4:127.0.0.1:1", "mnist"), "OK")

    served = threading.Thread(target=requests, daemon=True)
    served.start()
    served.join(timeout=10)
    stuck = served.is_alive()
    gate.set()
    log.close()
    assert not stuck, "a request waited for the writer"
    written = stdout.getvalue().splitlines()
    assert 5 <= len(written) <= 6 and all(json.loads(line)["model"] == "mnist" for line in written)
    assert f"{50 - len(written)} lines dropped" in caplog.text
