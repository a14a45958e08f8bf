"""`python -m serving.server` as a process: the shipped configs, the base_path rule, SIGTERM draining."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import configs
from serving.batching import BatchingOptions
from serving.server import build_models, parse_args
from tests.test_server_support import copy_model_base, predict_request

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_files_parse_with_the_tf_serving_protos():
    models = configs.read_text_proto(ROOT / "serving/models.config", configs.ModelServerConfig)
    (model,) = models.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("mnist", "/models/mnist", "tensorflow")
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    batching = BatchingOptions.from_proto(
        configs.read_text_proto(ROOT / "serving/batching.config", configs.BatchingParameters))
    assert batching.max_batch_size >= 8 and batching.num_batch_threads >= 1 and batching.batch_timeout_micros > 0
    monitoring = configs.read_text_proto(ROOT / "serving/monitoring.config", configs.MonitoringConfig)
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_config_syntax_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.config"
    bad.write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(ValueError, match=r"bad\.config"):
        configs.read_text_proto(bad, configs.ModelServerConfig)


def test_flags_mirror_tensorflow_model_server():
    options = parse_args(["--port=9000", "--rest_api_port", "9001", "--model_name=mnist", "--model_base_path=m",
                          "--enable_batching", "--file_system_poll_wait_seconds=0", "--rest_api_timeout_in_ms=5000"])
    assert (options.port, options.rest_api_port, options.model_name, options.model_base_path) == (9000, 9001,
                                                                                                  "mnist", "m")
    assert options.enable_batching is True and options.file_system_poll_wait_seconds == 0
    assert parse_args(["--enable_batching=false"]).enable_batching is False


def test_container_base_path_resolves_relative_to_the_current_dir(tmp_path, monkeypatch):
    (tmp_path / "models" / "mnist").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (model,) = build_models(parse_args([f"--model_config_file={ROOT / 'serving/models.config'}"]))
    assert model.name == "mnist" and model.base_path == Path("models/mnist")
    (model,) = build_models(parse_args([f"--model_config_file={ROOT / 'serving/models.config'}",
                                        "--model_name=mnist", "--model_base_path=/elsewhere"]))
    assert model.base_path == Path("/elsewhere")


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_sigterm_drains_in_flight_requests_and_exits_0(model_base_path, tmp_path, mnist_png_bytes):
    copy_model_base(model_base_path, tmp_path / "models" / "mnist")
    batching = tmp_path / "batching.config"
    # A lone request waits up to 3 s for company: long enough to be in flight when SIGTERM arrives.
    batching.write_text("max_batch_size { value: 64 } batch_timeout_micros { value: 3000000 }")
    command = [sys.executable, "-m", "serving.server", f"--model_config_file={ROOT / 'serving/models.config'}",
               "--port=0", "--rest_api_port=0", "--host=127.0.0.1", "--enable_batching",
               f"--batching_parameters_file={batching}",
               f"--monitoring_config_file={ROOT / 'serving/monitoring.config'}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    output = []
    channel = None
    try:
        while True:
            line = lines.get(timeout=120)
            assert line is not None, "server exited early:\n" + "".join(output)
            output.append(line)
            if line.startswith("listening "):
                ports = dict(item.split("=") for item in line.split()[1:])
                break
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}")  # one connection for every call
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        status_request = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"})
        status(status_request, timeout=60)  # connected
        future = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(
            predict_request([mnist_png_bytes[0][0]]), timeout=60)
        # A call sent after the Predict on the same connection has its answer: the server read the Predict
        # first and has taken it, so it is in flight (it waits 3 s in the batch queue for company).
        status(status_request, timeout=60)
        assert not future.done()
        process.send_signal(signal.SIGTERM)
        response = future.result()
        assert tf.make_ndarray(response.outputs["digit"]).shape == (1,)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        if channel is not None:
            channel.close()
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    text = "".join(output)
    assert "Loading servable mnist version 1 from models/mnist/1" in text
    assert "draining" in text and "Exiting cleanly" in text


def test_stop_ends_kept_alive_connections_instead_of_serving_them(serve):
    import http.client

    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    conn.request("GET", "/v1/models/mnist")
    response = conn.getresponse()
    assert response.status == 200 and b"AVAILABLE" in response.read()
    server.stop(grace_seconds=1)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/v1/models/mnist")
        conn.getresponse()
    conn.close()


def test_a_request_waiting_in_the_listen_backlog_at_stop_gets_its_answer(serve, mnist_png_bytes):
    """A connection the kernel accepted before the stop but the server had not yet taken was reset when the
    listening socket closed (one REST request in three at SIGTERM, under load)."""
    import base64
    import json
    import socket

    server = serve()
    server.rest.shutdown()  # the accept loop ends, as it does first at SIGTERM; the socket still listens
    body = json.dumps({"instances": [{"b64": base64.b64encode(mnist_png_bytes[0][0]).decode()}]}).encode()
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as conn:
        conn.sendall(b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        server.stop(grace_seconds=10)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"Connection: close" in answer and json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"]
