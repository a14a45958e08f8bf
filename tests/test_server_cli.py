"""`python -m serving.server` as a process: its flags (--help, what it refuses), the shipped configs, the base_path
rule, SIGTERM draining."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
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
from serving.server import ServerOptions, build_models, option_errors, parse_args, start_server
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


# --- the flags: help, booleans, unknown flags, contradictions ------------------------------------------------------

# Every flag the server had when its CLI was made strict, with its default as --help shows it (the Makefile,
# docker-compose.yml, k8s/, bench/ and the tests pass them).
FLAG_DEFAULTS = {
    "port": "8500", "rest_api_port": "8501", "model_name": '"default"', "model_base_path": '""',
    "model_config_file": '""', "enable_batching": "false", "batching_parameters_file": '""',
    "file_system_poll_wait_seconds": "1.0", "max_num_load_retries": "5", "load_retry_interval_micros": "60000000",
    "monitoring_config_file": '""', "rest_api_timeout_in_ms": "30000", "tensorflow_intra_op_parallelism": "0",
    "tensorflow_inter_op_parallelism": "0", "host": '"0.0.0.0"', "grace_period_seconds": "10.0",
    "static_dir": f'"{ROOT / "web"}"', "max_images_per_request": "4096", "malloc_arena_max": "2",
}
OWN_FLAGS = ("host", "grace_period_seconds", "static_dir", "max_images_per_request", "access_log_file",
             "malloc_arena_max")


def run_server(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m serving.server` with these flags, for commands that end by themselves (refusals, --help).
    COLUMNS keeps argparse from breaking a long default across lines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "serving.server", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help_lists_every_flag_with_its_default():
    run = run_server("--help")
    assert run.returncode == 0, run.stderr
    names = [option.name for option in dataclasses.fields(ServerOptions)]
    assert set(FLAG_DEFAULTS) <= set(names)
    listed = re.findall(r"^  (--\w+)", run.stdout, flags=re.MULTILINE)
    assert listed == [f"--{name}" for name in names]
    starts = [run.stdout.index(f"\n  --{name} ") for name in names]
    for name, start, end in zip(names, starts, [*starts[1:], len(run.stdout)]):
        entry = " ".join(run.stdout[start:end].split())
        assert entry.count("(default: ") == 1, entry
        text = entry.split(" ", 2)[2]  # without the flag and its metavar
        assert len(text.split("(default: ")[0]) > 20, f"--{name} has no help text: {entry}"
        if name in FLAG_DEFAULTS:
            assert f"(default: {FLAG_DEFAULTS[name]})" in entry, entry
        assert ("own flag" in entry) == (name in OWN_FLAGS), entry


@pytest.mark.parametrize("flags, value", [
    (["--enable_batching"], True), (["--enable_batching=true"], True), (["--enable_batching=True"], True),
    (["--enable_batching=TRUE"], True), (["--enable_batching=1"], True), (["--enable_batching", "true"], True),
    (["--enable_batching=false"], False), (["--enable_batching=False"], False), (["--enable_batching=0"], False),
    (["--enable_batching", "false"], False), ([], False),
])
def test_booleans_take_tensorflow_model_servers_spellings(flags, value):
    assert parse_args(flags).enable_batching is value


@pytest.mark.parametrize("value", ["ture", "yes", "no", "on", "t", "2", "-1", "", " true"])
def test_a_boolean_it_does_not_understand_is_refused(value, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args([f"--enable_batching={value}"])
    assert refused.value.code == 2
    assert f"argument --enable_batching: {value!r} is not a boolean" in capsys.readouterr().err


def test_a_misspelt_boolean_stops_the_server_naming_the_flag_and_the_value():
    run = run_server("--model_base_path=models/mnist", "--enable_batching=ture")
    assert run.returncode == 2
    assert "argument --enable_batching: 'ture' is not a boolean" in run.stderr
    assert "listening" not in run.stdout


@pytest.mark.parametrize("flag", ["--port=8500.0", "--port=1_000", "--port=", "--max_images_per_request=lots",
                                  "--file_system_poll_wait_seconds=nan", "--grace_period_seconds=inf"])
def test_numbers_of_the_wrong_kind_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args([flag])
    assert refused.value.code == 2
    name, _, value = flag.partition("=")
    assert f"argument {name}: {value!r} is not" in capsys.readouterr().err


def test_unknown_and_abbreviated_flags_stop_the_server():
    run = run_server("--model_base_path=models/mnist", "--enable_batch", "--model_nmae=mnist")
    assert run.returncode == 2
    assert "unrecognized arguments: --enable_batch --model_nmae=mnist" in run.stderr
    assert "listening" not in run.stdout


@pytest.mark.parametrize("argv", [["--enable_batch"], ["--model_base=m"], ["--rest_api_timeout=5"], ["-port=1"],
                                  ["models/mnist"]])
def test_unknown_flags_and_abbreviations_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(argv)
    assert refused.value.code == 2
    assert f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--model_base_path=models/mnist", "--batching_parameters_file=serving/batching.config"],
     "--batching_parameters_file is set without --enable_batching"),
    (["--model_base_path=models/mnist", "--port=9000", "--rest_api_port=9000"],
     "--port and --rest_api_port are both 9000"),
    (["--model_name=mnist"], "give --model_base_path (with --model_name) or --model_config_file"),
    (["--model_base_path=models/mnist", "--max_num_load_retries=-1"], "--max_num_load_retries=-1 is negative"),
], ids=["batching file without batching", "one port for both", "no model", "negative"])
def test_contradictory_flags_stop_the_server_before_anything_loads(flags, named):
    run = run_server(*flags)
    assert run.returncode == 2
    assert f"error: {named}" in run.stderr
    assert "Loading servable" not in run.stdout + run.stderr and "listening" not in run.stdout


def options(**flags) -> ServerOptions:
    return ServerOptions(**{"model_base_path": "models/mnist", **flags})


@pytest.mark.parametrize("flags, named", [
    (dict(model_base_path=""), "give --model_base_path (with --model_name) or --model_config_file"),
    (dict(batching_parameters_file="b.config"), "--batching_parameters_file is set without --enable_batching"),
    (dict(port=8500, rest_api_port=8500), "--port and --rest_api_port are both 8500"),
    (dict(port=-1), "--port=-1 is not a port"),
    (dict(port=65536), "--port=65536 is not a port"),
    (dict(rest_api_port=-2), "--rest_api_port=-2 is not a port"),
    (dict(rest_api_port=70000), "--rest_api_port=70000 is not a port"),
    (dict(file_system_poll_wait_seconds=-1.0), "--file_system_poll_wait_seconds=-1.0 is negative"),
    (dict(model_config_file_poll_wait_seconds=5.0),
     "--model_config_file_poll_wait_seconds is set without --model_config_file"),
    (dict(model_config_file="serving/models.config", model_config_file_poll_wait_seconds=-1.0),
     "--model_config_file_poll_wait_seconds=-1.0 is negative"),
    (dict(max_num_load_retries=-1), "--max_num_load_retries=-1 is negative"),
    (dict(tensorflow_intra_op_parallelism=-1), "--tensorflow_intra_op_parallelism=-1 is negative"),
    (dict(grace_period_seconds=-0.5), "--grace_period_seconds=-0.5 is negative"),
    (dict(max_images_per_request=-1), "--max_images_per_request=-1 is negative"),
    (dict(rest_api_timeout_in_ms=0), "--rest_api_timeout_in_ms=0: a timeout is more than 0"),
    (dict(static_dir="/no/such/dir"), "--static_dir=/no/such/dir: not a directory"),
])
def test_each_contradiction_and_meaningless_value_is_named(flags, named):
    (error,) = option_errors(options(**flags))
    assert error.startswith(named), error


def test_what_the_makefile_bench_and_tests_pass_is_accepted():
    assert option_errors(options()) == []
    assert option_errors(options(model_base_path="", model_config_file="serving/models.config")) == []
    assert option_errors(options(model_config_file="serving/models.config")) == []  # --model_base_path replaces
    assert option_errors(options(model_config_file="serving/models.config", model_config_file_poll_wait_seconds=60)) \
        == []
    assert option_errors(options(port=0, rest_api_port=0, host="127.0.0.1", file_system_poll_wait_seconds=0,
                                 enable_batching=True, batching_parameters_file="serving/batching.config",
                                 tensorflow_intra_op_parallelism=1, tensorflow_inter_op_parallelism=-1)) == []
    assert option_errors(options(rest_api_port=-1, static_dir="", max_images_per_request=0,
                                 load_retry_interval_micros=-1, grace_period_seconds=0)) == []


def test_a_server_started_in_process_refuses_the_same_before_it_starts():
    with pytest.raises(ValueError, match="--batching_parameters_file is set without --enable_batching"):
        start_server(options(batching_parameters_file="serving/batching.config", port=0, rest_api_port=0))


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
    assert "malloc arenas: at most 2" in text  # the default --malloc_arena_max, set before the threads start
    assert "Memory: heap given back" in text  # the trimmer's account at stop


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
