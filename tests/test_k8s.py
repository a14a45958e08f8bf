"""k8s/, checked without a cluster: every manifest against Kubernetes' JSON schemas, and the links between them.

The schemas come with the PyPI package kubernetes-validate (one strict set per Kubernetes minor version:
unknown fields are errors), so validation needs no network. The rest checks what a schema cannot: the
Service and the PodDisruptionBudget select the Deployment's pods, probes and Service ports name container
ports, the HPA scales the Deployment, the ConfigMap holds serving/*.config verbatim under the names the
flags use, and image and flags are docker-compose.yml's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tools import k8s_configmap
from training.config import add_flags, from_args

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# The oldest minor still commonly run and the newest the package ships schemas for.
KUBERNETES_VERSIONS = ["1.30", "1.37"]
# The serving stack, which kustomization.yaml applies as one. training-job.yaml is applied on its own (a training
# run must not start with every `kubectl apply -k k8s/`) and has tests of its own, at the end.
TRAINING_JOB = "training-job.yaml"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", TRAINING_JOB))


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    """Kind -> the one resource of that kind."""
    by_kind = {}
    for name in MANIFESTS:
        for doc in load(name):
            assert doc["kind"] not in by_kind, f"a second {doc['kind']} in {name}"
            by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def pod(resources) -> dict:
    return resources["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    [container] = pod["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def flags(container) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


@pytest.fixture(scope="module")
def compose_service() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["tf-serving"]


def container_port(container: dict, port: int | str) -> int:
    """The number of a container port given by name or number; fails if the container has no such port."""
    for declared in container["ports"]:
        if port in (declared["name"], declared["containerPort"]):
            return declared["containerPort"]
    raise AssertionError(f"port {port!r} is not one of the container's ports")


def mounted_volume(pod: dict, container: dict, mount_path: str) -> tuple[dict, dict]:
    """(volume, volumeMount) of the container's mount at mount_path."""
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume, mount


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_against_the_strict_schema(name, version):
    docs = load(name)
    assert docs, f"{name} is empty"
    for doc in docs:
        # Raises SchemaNotFoundError for a kind or apiVersion that version does not know, ValidationError
        # for a wrong type, a missing required field or an unknown one.
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    deployment = load("deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == MANIFESTS


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_resources(resources):
    run = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    built = {(doc["kind"], doc["metadata"]["name"]) for doc in yaml.safe_load_all(run.stdout) if doc}
    assert built == {(kind, doc["metadata"]["name"]) for kind, doc in resources.items()}


def test_the_usual_resources_are_there(resources):
    assert set(resources) == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                              "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_image_and_flags_are_docker_composes(container, compose_service):
    assert container["image"] == compose_service["image"]
    assert container["image"].rsplit(":", 1)[1][0].isdigit(), "pin a release, not a floating tag"
    assert container["command"] == compose_service["entrypoint"]
    assert container["args"] == compose_service["command"]


def test_configmap_holds_the_serving_config_files_verbatim(resources):
    data = resources["ConfigMap"]["data"]
    assert set(data) == set(k8s_configmap.CONFIG_FILES)
    for name, text in data.items():
        assert text == (ROOT / "serving" / name).read_text(), f"{name} differs: run `make k8s-config`"
    assert (K8S / "configmap.yaml").read_text() == k8s_configmap.render(), "run `make k8s-config`"


def test_config_flags_name_the_configmap_keys_where_it_is_mounted(resources, pod, container, flags):
    file_flags = {name: PurePosixPath(value) for name, value in flags.items() if name.endswith("_file")}
    assert {path.name for path in file_flags.values()} == set(resources["ConfigMap"]["data"])
    for path in file_flags.values():
        volume, mount = mounted_volume(pod, container, str(path.parent))
        assert volume["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
        assert mount["readOnly"] is True


def test_model_volume_is_the_claim_read_only_at_the_configs_base_path(resources, pod, container):
    models = text_format.Parse(resources["ConfigMap"]["data"]["models.config"],
                               model_server_config_pb2.ModelServerConfig())
    [model] = models.model_config_list.config
    volume, mount = mounted_volume(pod, container, model.base_path)
    assert volume["persistentVolumeClaim"]["claimName"] == resources["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    # Pods of one Deployment land on several nodes: the claim must be mountable by all of them.
    assert set(resources["PersistentVolumeClaim"]["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}


def test_ports_are_the_flags_and_named(container, flags):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(flags["port"]), "http": int(flags["rest_api_port"])}


def test_service_and_disruption_budget_select_the_deployments_pods(resources, pod):
    labels = pod["metadata"]["labels"]
    selectors = {
        "Deployment": resources["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service": resources["Service"]["spec"]["selector"],
        "PodDisruptionBudget": resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"the {kind} does not select the pods"


def test_service_exposes_grpc_and_rest_on_named_container_ports(resources, container):
    ports = {p["name"]: p for p in resources["Service"]["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}
    for name, port in ports.items():
        assert port["port"] == container_port(container, port["targetPort"]) == container_port(container, name)


def test_probes_ask_for_the_model_status_on_the_rest_port(container, flags):
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == "/v1/models/mnist", probe
        assert container_port(container, http_get["port"]) == int(flags["rest_api_port"]), probe


def test_resources_are_requested_and_limited(container, flags):
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert set(requests) == set(limits) == {"cpu", "memory"}

    def cpus(quantity: str) -> float:
        return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)

    assert cpus(requests["cpu"]) <= cpus(limits["cpu"])
    # The thread pools are sized to the CPUs the container may use.
    assert int(flags["tensorflow_intra_op_parallelism"]) <= cpus(limits["cpu"])


def test_autoscaler_scales_the_deployment_on_cpu(resources, container):
    hpa, deployment = resources["HorizontalPodAutoscaler"]["spec"], resources["Deployment"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container["resources"]["requests"], "utilisation is measured against the CPU request"
    budget = resources["PodDisruptionBudget"]["spec"]["minAvailable"]
    assert budget < hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]


def test_prometheus_annotation_names_the_monitoring_path(resources, pod, flags):
    path = PurePosixPath(flags["monitoring_config_file"]).name
    monitoring = resources["ConfigMap"]["data"][path]
    annotations = pod["metadata"]["annotations"]
    assert f'path: "{annotations["prometheus.io/path"]}"' in monitoring
    assert annotations["prometheus.io/port"] == flags["rest_api_port"]


def test_probe_path_answers_200_only_for_the_served_model(embedded_server, container):
    """The embedded server speaks TF Serving's REST API: what the probes ask, it answers as TF Serving would."""
    path = container["readinessProbe"]["httpGet"]["path"]
    for probe_path, status in ((path, 200), (path.replace("mnist", "other"), 404)):
        conn = http.client.HTTPConnection("127.0.0.1", embedded_server.rest_port, timeout=10)
        conn.request("GET", probe_path)
        assert conn.getresponse().status == status, probe_path
        conn.close()


# The multi-worker training Job (training-job.yaml): an Indexed Job, a headless Service and the claim of its source.


@pytest.fixture(scope="module")
def training() -> dict[str, dict]:
    """Kind -> the one resource of that kind in training-job.yaml."""
    docs = load(TRAINING_JOB)
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "two resources of one kind"
    return by_kind


@pytest.fixture(scope="module")
def training_pod(training) -> dict:
    return training["Job"]["spec"]["template"]


@pytest.fixture(scope="module")
def worker(training_pod) -> dict:
    [container] = training_pod["spec"]["containers"]
    return container


def tf_config_of_pod(worker: dict, index: int) -> dict:
    """TF_CONFIG as the container's own command builds it in the pod of completion `index` (Kubernetes sets
    JOB_COMPLETION_INDEX): the command runs here with its args swapped for a Python that prints the variable."""
    show = [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"]
    run = subprocess.run([*worker["command"], *show], env={"JOB_COMPLETION_INDEX": str(index)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def training_config(worker: dict):
    """The Config the container's args give `python -m training.train` (its own parser: an unknown or misspelt
    flag fails here as it would in the pod)."""
    _python, dash_m, module, *flags = worker["args"]
    assert (dash_m, module) == ("-m", "training.train")
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args(parser.parse_args(flags))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_training_job_is_valid_against_the_strict_schema(version):
    for doc in load(TRAINING_JOB):
        kubernetes_validate.validate(doc, version, strict=True)


def test_training_job_is_applied_on_its_own(training):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert TRAINING_JOB not in kustomization["resources"]
    assert set(training) == {"Job", "Service", "PersistentVolumeClaim"}


def test_training_job_runs_one_indexed_pod_per_worker_of_tf_config(training, worker):
    job = training["Job"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] >= 2
    configs = [tf_config_of_pod(worker, index) for index in range(job["completions"])]
    workers = configs[0]["cluster"]["worker"]
    assert len(workers) == job["parallelism"]
    for index, config in enumerate(configs):
        assert config == {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def test_training_workers_are_the_pods_stable_names_through_the_headless_service(resources, pod, training,
                                                                                 training_pod, worker):
    service, job = training["Service"], training["Job"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= training_pod["metadata"]["labels"].items()
    assert training_pod["spec"]["subdomain"] == service["metadata"]["name"]
    [port] = service["spec"]["ports"]
    assert container_port(worker, port["targetPort"]) == port["port"]
    # An Indexed Job's pods are named <job>-<index>, and <hostname>.<subdomain> resolves in their namespace.
    expected = [f"{job['metadata']['name']}-{index}.{service['metadata']['name']}:{port['port']}"
                for index in range(job["spec"]["completions"])]
    assert tf_config_of_pod(worker, 0)["cluster"]["worker"] == expected
    # Neither Service picks the other's pods.
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not resources["Service"]["spec"]["selector"].items() <= training_pod["metadata"]["labels"].items()


def test_training_job_exports_into_the_claim_tf_serving_reads(resources, pod, container, training_pod, worker):
    models = text_format.Parse(resources["ConfigMap"]["data"]["models.config"],
                               model_server_config_pb2.ModelServerConfig())
    [model] = models.model_config_list.config
    serving_volume, _ = mounted_volume(pod, container, model.base_path)
    volume, mount = mounted_volume(training_pod, worker, model.base_path)
    assert volume["persistentVolumeClaim"]["claimName"] == serving_volume["persistentVolumeClaim"]["claimName"]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    cfg = training_config(worker)
    assert cfg.strategy == "multi_worker"
    assert cfg.export_dir == model.base_path


def test_training_job_writes_only_to_volumes_and_keeps_its_backup_on_one(training, training_pod, worker):
    """The root file system is read-only; the chief's backup must outlive a pod for a restarted one to resume."""
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert training_pod["spec"]["restartPolicy"] == "OnFailure"
    cfg = training_config(worker)
    volumes = {v["name"]: v for v in training_pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in worker["volumeMounts"]}

    def volume_of(path: str) -> dict:
        absolute = PurePosixPath(worker["workingDir"], path)
        [volume] = [v for mount, v in mounts.items() if absolute.is_relative_to(mount)]
        return volume

    for path in (cfg.run_dir, cfg.reports_dir, cfg.export_dir, cfg.data_dir, worker["args"][0]):
        volume_of(path)
    assert "persistentVolumeClaim" in volume_of(cfg.run_dir)
    claim = volume_of(cfg.run_dir)["persistentVolumeClaim"]["claimName"]
    assert claim == training["PersistentVolumeClaim"]["metadata"]["name"]
    # Both workers mount it, maybe from two nodes.
    assert training["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_training_image_is_pinned_and_its_python_is_the_projects(worker):
    image, tag = worker["image"].rsplit(":", 1)
    assert image == "python" and tag[0].isdigit(), "pin a release, not a floating tag"
    assert tag.startswith(f"{sys.version_info.major}.{sys.version_info.minor}."), \
        "the virtual environment on the volume is made in this image: keep it the Python the project runs on"
