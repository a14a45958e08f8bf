"""docker-compose.yml, checked without Docker: what it pins, publishes, mounts and configures.

No Docker engine runs here, so `docker compose up` is out of reach; what can be checked is that the file is
consistent with the repository (image tag = installed TensorFlow, every mounted file and config flag exists,
the config files parse with TF Serving's protos) and that its healthcheck probe really works, run with bash
against the embedded server serving the same config files.
"""

from __future__ import annotations

import http.client
import importlib
import importlib.metadata
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

ROOT = Path(__file__).resolve().parents[1]
MODEL_EXPORT_DIR = "models/mnist"  # written by `python -m training.train --export-dir models/mnist`, not in git


def _proto(module: str, name: str):
    """The message class from the tensorflow-serving-api wheel; the wheel ships neither
    monitoring_config_pb2 nor session_bundle_config_pb2, so for those the server's rebuild of the upstream
    definitions (serving/configs.py: same package, names and field numbers) stands in."""
    try:
        return getattr(importlib.import_module(f"tensorflow_serving.{module}"), name)
    except ImportError:
        from serving import configs

        return getattr(configs, name)


CONFIG_PROTOS = {
    "model_config_file": model_server_config_pb2.ModelServerConfig,
    "batching_parameters_file": _proto("servables.tensorflow.session_bundle_config_pb2", "BatchingParameters"),
    "monitoring_config_file": _proto("config.monitoring_config_pb2", "MonitoringConfig"),
}


@pytest.fixture(scope="module")
def service() -> dict:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["tf-serving"]
    return service


@pytest.fixture(scope="module")
def flags(service) -> dict[str, str]:
    """The command's --name=value flags (the entrypoint is the server binary itself)."""
    assert service["entrypoint"] == ["tensorflow_model_server"]
    parsed = {}
    for arg in service["command"]:
        match = re.fullmatch(r"--(\w+)=(.*)", arg)
        assert match, f"flag not in --name=value form: {arg}"
        parsed[match[1]] = match[2]
    return parsed


@pytest.fixture(scope="module")
def mounts(service) -> dict[PurePosixPath, tuple[Path, bool]]:
    """Container path -> (host path, read-only) for every bind mount."""
    result = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        assert source.startswith("./"), f"not a bind mount relative to the repository: {volume}"
        result[PurePosixPath(target)] = (ROOT / source, mode == ["ro"])
    return result


def host_path(container_path: str, mounts) -> Path:
    """Where a container path lives in the repository, through the mount that holds it."""
    path = PurePosixPath(container_path)
    for target, (source, _) in mounts.items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is in no mounted directory ({sorted(map(str, mounts))})")


def config(flag: str, flags, mounts):
    parsed = CONFIG_PROTOS[flag]()
    text_format.Parse(host_path(flags[flag], mounts).read_text(), parsed)
    return parsed


def test_image_is_tf_serving_pinned_to_the_installed_tensorflow(service):
    image, _, tag = service["image"].partition(":")
    assert image == "tensorflow/serving"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin an exact release, not {tag!r}"
    installed = importlib.metadata.version("tensorflow")
    assert tag.split(".")[:2] == installed.split(".")[:2], f"image {tag} but tensorflow {installed}"


def test_ports_are_published_as_the_server_listens(service, flags):
    assert sorted(service["ports"]) == ["8500:8500", "8501:8501"]
    assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"


def test_mounts_are_read_only_and_exist_in_the_repository(mounts):
    assert all(read_only for _, read_only in mounts.values())
    for target, (source, _) in mounts.items():
        relative = source.relative_to(ROOT).as_posix()
        if relative == MODEL_EXPORT_DIR:
            # A build output: the training CLI writes it and .gitignore keeps it out of the repository.
            assert "/models/" in (ROOT / ".gitignore").read_text().split()
        else:
            assert source.exists(), f"{source} (mounted at {target}) is missing"


def test_every_file_flag_points_at_a_mounted_file_in_the_repository(flags, mounts):
    file_flags = {name: value for name, value in flags.items() if name.endswith("_file")}
    assert set(file_flags) == set(CONFIG_PROTOS)
    for name, value in file_flags.items():
        assert host_path(value, mounts).is_file(), f"--{name}={value}"


def test_serving_features_are_switched_on(service, flags):
    assert flags["enable_batching"] == "true"
    assert int(flags["file_system_poll_wait_seconds"]) > 0
    assert flags["enable_model_warmup"] == "true"
    assert service["restart"] == "unless-stopped"
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) >= 1 and limits["memory"]


def test_model_config_serves_mnist_from_the_mounted_export(flags, mounts):
    [model] = config("model_config_file", flags, mounts).model_config_list.config
    assert model.name == "mnist"
    assert model.model_platform == "tensorflow"
    assert host_path(model.base_path, mounts) == ROOT / MODEL_EXPORT_DIR


def test_batching_and_monitoring_configs_parse(flags, mounts):
    batching = config("batching_parameters_file", flags, mounts)
    assert batching.max_batch_size.value >= 1 and batching.num_batch_threads.value >= 1
    assert batching.batch_timeout_micros.value > 0
    prometheus = config("monitoring_config_file", flags, mounts).prometheus_config
    assert prometheus.enable and prometheus.path.startswith("/")


def test_a_broken_config_fails_to_parse():
    with pytest.raises(text_format.ParseError):
        text_format.Parse("model_config_list { config { nmae: 'mnist' } }", CONFIG_PROTOS["model_config_file"]())


@pytest.fixture(scope="module")
def compose_like_server(serve_module, flags, mounts):
    """The embedded server run with docker-compose's own config files, on free ports of 127.0.0.1."""
    return serve_module(
        model_config_file=str(host_path(flags["model_config_file"], mounts)),
        enable_batching=flags["enable_batching"] == "true",
        batching_parameters_file=str(host_path(flags["batching_parameters_file"], mounts)),
        monitoring_config_file=str(host_path(flags["monitoring_config_file"], mounts)))


def healthcheck_argv(service, port: int) -> list[str]:
    kind, *argv = service["healthcheck"]["test"]
    assert kind == "CMD" and argv[0] == "bash"  # the image has bash, not curl or wget
    assert "$" not in " ".join(argv), "compose would interpolate $: escape it as $$"
    assert "/dev/tcp/127.0.0.1/8501" in argv[-1]
    return [arg.replace("/8501", f"/{port}") for arg in argv]


def test_healthcheck_passes_once_the_model_is_available(service, compose_like_server):
    run = subprocess.run(healthcheck_argv(service, compose_like_server.rest_port), capture_output=True, check=False,
                         timeout=10)
    assert run.returncode == 0, run.stderr


def test_healthcheck_fails_when_nothing_listens(service):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(healthcheck_argv(service, port), capture_output=True, check=False, timeout=10)
    assert run.returncode != 0


def test_healthcheck_fails_when_the_model_is_not_served(service, compose_like_server):
    argv = healthcheck_argv(service, compose_like_server.rest_port)
    argv[-1] = argv[-1].replace("/v1/models/mnist ", "/v1/models/other ")
    run = subprocess.run(argv, capture_output=True, check=False, timeout=10)
    assert run.returncode != 0


def test_monitoring_path_serves_prometheus_metrics(flags, mounts, compose_like_server):
    path = config("monitoring_config_file", flags, mounts).prometheus_config.path
    conn = http.client.HTTPConnection("127.0.0.1", compose_like_server.rest_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        assert b"# TYPE" in response.read()
    finally:
        conn.close()
