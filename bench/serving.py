"""How fast is inference, in process and through the embedded server? One run measures, on one machine:

    python -m bench.serving --model models/mnist --duration 10 --out docs/benchmarks.json
    python -m bench.serving --model models/mnist --smoke          # a second a cell: checks that it all works

1. in process: the `serving_default` signature called directly, one image (p50, p99) and batches; and where its
   time goes: the image graph alone, the network alone and both, at batch 1, 8 and 64; with `--reference
   EXPORT`, one image through this export and through another (say, one an older checkout made), alternating;
2. the embedded server (a subprocess, batching on, `serving/batching.config`) over gRPC and REST, closed loop
   at each concurrency, single-image requests, answers checked against the in-process answer;
3. its resident memory (VmRSS of the subprocess) sampled through a long run at the highest concurrency;
4. the naive baseline (`bench.baseline`: Pillow + Keras `model.predict` per request) at the same concurrency;
5. what each load generator costs in CPU a request, and so the most it can measure on one core.

gRPC load comes from h2load, REST load from wrk (Debian packages nghttp2-client and wrk); without them the
harness says so and falls back to Python clients, which cap what can be measured far below the server.
The image is the first one in the model's warmup file, so any exported version brings its own input.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc

from bench import loadgen
from serving.models import WARMUP_FILE, scan_versions

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "mnist"
METRICS_PATH = "/monitoring/prometheus/metrics"  # as in serving/monitoring.config
# Measured best on 2 cores (docs/benchmarks.md): one intra-op thread; inter-op -1, which TF Serving reads as
# "the calling thread" and TensorFlow 2, in the embedded server, as its default pool.
SERVER_THREAD_FLAGS = ("--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=-1")
MAX_MEMORY_GROWTH_MB = 10.0  # "flat": RSS at the end of the long run within this of RSS after its warm-up


@dataclass
class Settings:
    model: Path
    duration: float = 10.0
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    memory_seconds: float = 60.0
    baseline_concurrency: int = 8
    batching_config: Path = ROOT / "serving" / "batching.config"
    server_args: tuple[str, ...] = SERVER_THREAD_FLAGS
    image: Path | None = None
    use_c_generators: bool = True
    baseline: bool = True
    warmup: float = 1.0  # seconds of load before each h2load cell is measured
    python_client_cell: bool = True  # also measure with the Python gRPC client, to show its ceiling
    overlap_startup: bool = False  # start both servers while measuring in process: saves time, skews figures
    server_root: Path = ROOT  # where `python -m serving.server` runs from: another checkout compares versions
    reference: Path | None = None  # another export whose one-image p50 is measured beside ours (issue 15)
    progress: Callable[[str], None] = field(default=lambda message: print(f"[bench] {message}", flush=True))

    @classmethod
    def smoke(cls, model: Path, **overrides) -> Settings:
        """A second or so a cell at concurrency 1 and 2: proves the harness works, measures little."""
        values = dict(duration=1.0, concurrency=(1, 2), batch_sizes=(1, 8), memory_seconds=2.0,
                      baseline_concurrency=2, warmup=0.0, python_client_cell=False,
                      overlap_startup=True)
        values.update(overrides)
        return cls(model, **values)


def version_dir(model: Path) -> Path:
    """--model is a version directory or a base path holding integer versions (the newest is used)."""
    if (model / "saved_model.pb").exists():
        return model
    versions = scan_versions(model)
    if not versions:
        raise ValueError(f"{model}: neither a SavedModel nor a base path with version directories")
    return versions[max(versions)]


def sample_image(version: Path) -> bytes:
    for record in tf.data.TFRecordDataset(str(version / WARMUP_FILE)).take(1):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        return tf.make_ndarray(request.inputs["image_bytes"]).ravel()[0]
    raise ValueError(f"{version}: empty warmup file")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "platform": platform.platform(), "git_commit": commit.stdout.strip(),
            "h2load": loadgen.available("h2load"), "wrk": loadgen.available("wrk")}


def in_process(version: Path, image: bytes, settings: Settings) -> dict:
    signature = tf.saved_model.load(str(version)).signatures["serving_default"]
    one = tf.constant([image])
    for _ in range(20):
        signature(image_bytes=one)
    latencies, stop = [], time.perf_counter() + settings.duration / 2
    while time.perf_counter() < stop or len(latencies) < 20:
        started = time.perf_counter()
        outputs = signature(image_bytes=one)
        latencies.append((time.perf_counter() - started) * 1000)
    result = {"latency_p50_ms": loadgen.percentile(latencies, 50), "latency_p99_ms": loadgen.percentile(latencies, 99),
              "latency_calls": len(latencies), "digit": int(outputs["digit"][0]),
              "probabilities": outputs["probabilities"][0].numpy().tolist(), "throughput": {}}
    for batch in settings.batch_sizes:
        images = tf.constant([image] * batch)
        signature(image_bytes=images)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < settings.duration / len(settings.batch_sizes) or calls < 3:
            signature(image_bytes=images)
            calls += 1
        result["throughput"][str(batch)] = calls * batch / (time.perf_counter() - started)
    return result


class ServerProcess:
    """A server subprocess that prints `listening ...port=N...` when ready; its output is drained meanwhile."""

    def __init__(self, command: list[str], cwd: Path = ROOT, wait: bool = True) -> None:
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 180) -> None:
        if self.ports:
            return
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited before listening:\n{''.join(self.lines[-30:])}")
            self.lines.append(line)
            if line.startswith("listening "):
                self.ports = {k: int(v) for k, v in (w.split("=") for w in line.split()[1:]) if v != "None"}
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start in time")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines = [*self.lines[-200:], line]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def counters(self) -> dict[str, float]:
        """The server's Prometheus counters: request counts by api and status, batch size sum and count."""
        port = self.ports.get("rest_port")
        if not port:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{METRICS_PATH}", timeout=10) as answer:
            text = answer.read().decode()
        found = {}
        for line in text.splitlines():
            match = re.match(r':tensorflow:serving:request_count\{.*api="(\w+)",status="(\w+)"\} (\d+)', line)
            if match:
                key = f"{match[1]}/{match[2]}"  # summed over the model's versions (one series each)
                found[key] = found.get(key, 0.0) + float(match[3])
            match = re.match(r":tensorflow:serving:batching_session:processed_batch_size_(sum|count) ([\d.e+]+)", line)
            if match:
                found[f"batch_{match[1]}"] = float(match[2])
        return found

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def predict_request(image: bytes) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
    return request


def rest_body(image: bytes) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()


def check_grpc(port: int, request: predict_pb2.PredictRequest, expected: dict) -> int:
    """One Predict through the official stubs, compared with the in-process answer; returns the answer's size."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    digit = int(tf.make_ndarray(response.outputs["digit"])[0])
    probabilities = tf.make_ndarray(response.outputs["probabilities"])[0]
    if digit != expected["digit"] or not np.allclose(probabilities, expected["probabilities"], atol=1e-4):
        raise AssertionError(f"gRPC answer {digit} {probabilities} differs from in-process {expected['digit']}")
    return response.ByteSize()


def check_rest(port: int, body: bytes, expected: dict, path: str = f"/v1/models/{MODEL_NAME}:predict") -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read())["predictions"][0]
    conn.close()
    if answer["digit"] != expected["digit"] or abs(answer["probability"] - max(expected["probabilities"])) > 1e-4:
        raise AssertionError(f"REST answer {answer} differs from in-process digit {expected['digit']}")


def _with_server_cpu(server: ServerProcess, run: Callable[[], loadgen.Cell]) -> loadgen.Cell:
    """Adds the server's CPU time, its own count of failed requests and its mean batch size to the cell."""
    cpu, before = server.cpu_seconds(), server.counters()
    cell = run()
    cell.server_cpu_s = server.cpu_seconds() - cpu
    cell.load_average = os.getloadavg()[0]
    after = server.counters()
    delta = {key: value - before.get(key, 0) for key, value in after.items()}
    # CANCELLED: the generator stopping with requests in flight at the end of the cell, not a failure
    failed = sum(v for k, v in delta.items()
                 if k.startswith(f"{cell.api}/") and not k.endswith(("/OK", "/CANCELLED")))
    if delta.get(f"{cell.api}/CANCELLED"):
        cell.notes.append(f"{delta[f'{cell.api}/CANCELLED']:.0f} {cell.api} requests in flight at the end, cancelled")
    if failed:
        cell.errors += int(failed)
        cell.notes.append(f"the server counted {failed:.0f} failed {cell.api} requests")
    cell.server_requests = int(delta.get(f"{cell.api}/OK", 0))
    if delta.get("batch_count"):
        cell.mean_batch = delta["batch_sum"] / delta["batch_count"]
    return cell


def server_cells(server: ServerProcess, image: bytes, expected: dict, settings: Settings,
                 workdir: Path) -> tuple[list[loadgen.Cell], list[str]]:
    grpc_port, rest_port = server.ports["grpc_port"], server.ports["rest_port"]
    request, body = predict_request(image), rest_body(image)
    response_bytes = check_grpc(grpc_port, request, expected)
    check_rest(rest_port, body, expected)
    checks = ["grpc stub before load", "rest before load"]
    h2load = settings.use_c_generators and loadgen.available("h2load")
    wrk = settings.use_c_generators and loadgen.available("wrk")
    cells = []
    for concurrency in settings.concurrency:
        settings.progress(f"server gRPC c={concurrency} ({'h2load' if h2load else 'python'})")
        if h2load:
            run = lambda c=concurrency: loadgen.h2load_grpc(grpc_port, request, response_bytes, c,  # noqa: E731
                                                            settings.duration, workdir, settings.warmup)
        else:
            run = lambda c=concurrency: loadgen.python_grpc(grpc_port, request, expected["digit"], c,  # noqa: E731
                                                            settings.duration)
        cells.append(_with_server_cpu(server, run))
    for concurrency in settings.concurrency:
        settings.progress(f"server REST c={concurrency} ({'wrk' if wrk else 'python'})")
        if wrk:
            run = lambda c=concurrency: loadgen.wrk_rest(rest_port, MODEL_NAME, body, expected["digit"], c,  # noqa: E731
                                                         settings.duration, workdir)
        else:
            run = lambda c=concurrency: loadgen.python_rest(rest_port, MODEL_NAME, body, expected["digit"], c,  # noqa: E731
                                                            settings.duration)
        cells.append(_with_server_cpu(server, run))
    if h2load and settings.python_client_cell:  # the Python client too, to show what it cannot measure
        concurrency = max(settings.concurrency)
        settings.progress(f"server gRPC c={concurrency} (python client, for its ceiling)")
        cells.append(_with_server_cpu(server, lambda: loadgen.python_grpc(
            grpc_port, request, expected["digit"], concurrency, max(1.0, settings.duration / 2))))
    check_grpc(grpc_port, request, expected)
    check_rest(rest_port, body, expected)
    checks += ["grpc stub after load", "rest after load"]
    return cells, checks


def memory_run(server: ServerProcess, image: bytes, expected: dict, settings: Settings, workdir: Path) -> dict:
    """RSS every half second while the highest concurrency runs for memory_seconds."""
    concurrency = max(settings.concurrency)
    request = predict_request(image)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, server.rss_mb()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        port = server.ports["grpc_port"]
        if settings.use_c_generators and loadgen.available("h2load"):
            size = check_grpc(port, request, expected)
            cell = _with_server_cpu(server, lambda: loadgen.h2load_grpc(port, request, size, concurrency,
                                                                        settings.memory_seconds, workdir))
        else:
            cell = _with_server_cpu(server, lambda: loadgen.python_grpc(port, request, expected["digit"],
                                                                        concurrency, settings.memory_seconds))
    finally:
        stop.set()
        sampler.join()
    rss = [mb for _, mb in samples]
    tenth = max(1, len(rss) // 10)
    warm = float(np.median(rss[tenth:2 * tenth] or rss[:tenth]))
    end = float(np.median(rss[-tenth:]))
    return {"concurrency": concurrency, "seconds": settings.memory_seconds, "requests": cell.requests,
            "errors": cell.errors, "rss_before_mb": rss[0], "rss_after_warmup_mb": warm, "rss_end_mb": end,
            "rss_max_mb": max(rss), "growth_mb": end - warm, "samples": [[round(t, 1), round(mb, 1)]
                                                                        for t, mb in samples]}


def baseline_command(version: Path) -> list[str]:
    return [sys.executable, "-m", "bench.baseline", "--model", str(version), "--port", "0"]


def baseline_cell(server: ServerProcess, image: bytes, expected: dict, settings: Settings,
                  workdir: Path) -> loadgen.Cell:
    server.wait_ready()
    with server:
        port, body = server.ports["port"], rest_body(image)
        check_rest(port, body, expected, "/")
        concurrency = settings.baseline_concurrency
        if settings.use_c_generators and loadgen.available("wrk"):
            return _with_server_cpu(server, lambda: loadgen.wrk_rest(port, MODEL_NAME, body, expected["digit"],
                                                                     concurrency, settings.duration, workdir))
        return _with_server_cpu(server, lambda: loadgen.python_rest(port, MODEL_NAME, body, expected["digit"],
                                                                    concurrency, settings.duration))


def server_command(base_path: Path, settings: Settings, batching: bool = True) -> list[str]:
    """The embedded server on free ports of 127.0.0.1, batching per settings.batching_config unless `batching` is
    off (then without a batching file: the server refuses one without --enable_batching, as TF Serving does)."""
    batching_flags = ["--enable_batching", f"--batching_parameters_file={settings.batching_config}"] if batching else []
    return [sys.executable, "-m", "serving.server", f"--model_name={MODEL_NAME}", f"--model_base_path={base_path}",
            "--port=0", "--rest_api_port=0", "--host=127.0.0.1", "--file_system_poll_wait_seconds=0",
            *batching_flags, f"--monitoring_config_file={ROOT / 'serving' / 'monitoring.config'}",
            *settings.server_args]


def generator_costs(cells: list[loadgen.Cell]) -> dict:
    """CPU microseconds a request each generator spent, and the request rate that allows on one core."""
    costs = {}
    for cell in cells:
        if cell.requests and cell.generator_cpu_s:
            key = f"{cell.api}/{cell.generator}"
            per_request = cell.generator_cpu_s / cell.requests * 1e6
            if key not in costs or per_request < costs[key]["cpu_us_per_request"]:
                costs[key] = {"cpu_us_per_request": per_request, "ceiling_rps_one_core": 1e6 / per_request}
    return costs


SPLIT_BATCHES = (1, 8, 64)


def _rate(call: Callable[[], object], batch: int, seconds: float) -> dict:
    """images/s and microseconds an image of `call` on `batch` images, after three calls to warm it up."""
    for _ in range(3):
        call()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 3:
        call()
        calls += 1
    elapsed = time.perf_counter() - started
    return {"images_per_s": calls * batch / elapsed, "us_per_image": elapsed / (calls * batch) * 1e6}


def graph_split(version: Path, image: bytes, settings: Settings) -> dict:
    """Where the time of serving_default goes, in one run (issue 15): for batches of 1, 8 and 64 copies of the
    image, the image graph alone (training.preprocessing.decode_batch, the code the export puts before the
    network, run as a tf.function), the network alone (predict_pixels on the pixels the image graph made) and
    both (serving_default). The image graph is this checkout's: for a model exported by other code, compare
    "both" with the other two with that in mind."""
    from training.preprocessing import decode_images

    signatures = tf.saved_model.load(str(version)).signatures
    image_graph = decode_images
    seconds = settings.duration / (3 * len(SPLIT_BATCHES))
    split = {}
    for batch in SPLIT_BATCHES:
        images = tf.constant([image] * batch)
        pixels = image_graph(images)
        calls = {"image_graph": lambda images=images: image_graph(images),
                 "network": lambda pixels=pixels: signatures["predict_pixels"](pixels=pixels),
                 "both": lambda images=images: signatures["serving_default"](image_bytes=images)}
        split[str(batch)] = {name: _rate(call, batch, seconds) for name, call in calls.items()}
    return split


def reference_cell(version: Path, reference: Path, image: bytes, settings: Settings) -> dict:
    """One image through `serving_default` of this export and of a reference export (e.g. one made by an older
    checkout), in the same process, in three alternating rounds: the p50 of each and their ratio."""
    one = tf.constant([image])
    calls = {name: tf.saved_model.load(str(path)).signatures["serving_default"]
             for name, path in (("ours", version), ("reference", version_dir(reference)))}
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):
        for name, call in calls.items():
            for _ in range(20):
                call(image_bytes=one)
            stop = time.perf_counter() + settings.duration / 6
            while time.perf_counter() < stop or len(latencies[name]) < 20:
                started = time.perf_counter()
                call(image_bytes=one)
                latencies[name].append((time.perf_counter() - started) * 1000)
    p50 = {name: loadgen.percentile(values, 50) for name, values in latencies.items()}
    return {"model": str(version_dir(reference).resolve()), "ours_p50_ms": p50["ours"],
            "reference_p50_ms": p50["reference"], "ratio": p50["ours"] / p50["reference"]}


def criteria(results: dict) -> dict:
    grpc_cells: dict[int, dict] = {}
    for cell in results["server"]:  # the first gRPC cell of each concurrency: the Python-client extra comes last
        if cell["api"] == "grpc":
            grpc_cells.setdefault(cell["concurrency"], cell)
    inproc = results["in_process"]
    c1 = grpc_cells.get(1)
    c32 = grpc_cells.get(32)
    batch64 = inproc["throughput"].get("64")
    baseline, memory = results["baseline"], results["memory"]
    errors = sum(c["errors"] for c in [*results["server"], memory or {}, baseline or {}] if c)
    split64, reference = results["graph_split"].get("64"), results.get("reference")
    return {  # issue 5's, then issue 15's

        "grpc_c1_p50_within_0.5ms": None if not c1 else c1["p50_ms"] <= inproc["latency_p50_ms"] + 0.5,
        "grpc_c32_at_least_70pct_of_batch64": None if not (c32 and batch64) else c32["rps"] >= 0.7 * batch64,
        "grpc_c32_at_least_20x_baseline": None if not (c32 and baseline) else c32["rps"] >= 20 * baseline["rps"],
        "no_errors": errors == 0,
        "memory_flat": None if not memory else memory["growth_mb"] <= MAX_MEMORY_GROWTH_MB,
        "png_batch64_at_least_60pct_of_network_alone": None if not split64 else (
            split64["both"]["images_per_s"] >= 0.6 * split64["network"]["images_per_s"]),
        "one_image_at_most_0.45x_of_the_reference_export": None if not reference else reference["ratio"] <= 0.45,
        "grpc_c1_p50_within_0.3ms": None if not c1 else c1["p50_ms"] <= inproc["latency_p50_ms"] + 0.3,
        "grpc_c32_at_least_85pct_of_batch64": None if not (c32 and batch64) else c32["rps"] >= 0.85 * batch64,
    }


def run(settings: Settings) -> dict:
    version = version_dir(settings.model)
    image = settings.image.read_bytes() if settings.image else sample_image(version)
    results: dict = {"machine": machine(), "model": str(version.resolve()),
                     "settings": {"duration_s": settings.duration, "concurrency": list(settings.concurrency),
                                  "batch_sizes": list(settings.batch_sizes),
                                  "memory_seconds": settings.memory_seconds,
                                  "baseline_concurrency": settings.baseline_concurrency,
                                  "batching_config": settings.batching_config.read_text(),
                                  "server_args": list(settings.server_args)}}
    if not (results["machine"]["h2load"] and results["machine"]["wrk"]):
        settings.progress("h2load or wrk missing (apt-get install nghttp2-client wrk): using Python load "
                          "generators, which cannot measure a fast server on few cores")
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    base = workdir / "base"
    base.mkdir()
    (base / "1").symlink_to(version.resolve())
    early = settings.overlap_startup
    server = ServerProcess(server_command(base, settings), settings.server_root, wait=False) if early else None
    baseline = ServerProcess(baseline_command(version), wait=False) if early and settings.baseline else None
    try:
        settings.progress("in-process signature")
        results["in_process"] = expected = in_process(version, image, settings)
        settings.progress("in process: image graph, network, both")
        results["graph_split"] = graph_split(version, image, settings)
        results["reference"] = None
        if settings.reference:
            settings.progress(f"in process: one image, this export against {settings.reference}")
            results["reference"] = reference_cell(version, settings.reference, image, settings)
        settings.progress("starting the embedded server")
        with server or ServerProcess(server_command(base, settings), settings.server_root) as server:
            server.wait_ready()
            results["server_rss_idle_mb"] = server.rss_mb()
            cells, checks = server_cells(server, image, expected, settings, workdir)
            results["server"] = [cell.as_dict() for cell in cells]
            results["answers_checked"] = checks
            results["memory"] = None
            if settings.memory_seconds > 0:
                settings.progress(f"memory: c={max(settings.concurrency)} for {settings.memory_seconds:.0f} s")
                results["memory"] = memory_run(server, image, expected, settings, workdir)
        results["baseline"] = None
        if settings.baseline:
            settings.progress(f"naive baseline c={settings.baseline_concurrency}")
            baseline = baseline or ServerProcess(baseline_command(version))
            results["baseline"] = baseline_cell(baseline, image, expected, settings, workdir).as_dict()
            cells.append(loadgen.Cell(**results["baseline"]))
    finally:
        for process in (server, baseline):
            if process and process.proc.poll() is None:
                process.stop()
    results["generators"] = generator_costs(cells)
    results["criteria"] = criteria(results)
    results["machine"]["load_average_at_end"] = os.getloadavg()  # other work during the run shows here
    return results


def markdown(results: dict) -> str:
    m, inproc = results["machine"], results["in_process"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
             f"TensorFlow {m['tensorflow']}; load average at start {m['load_average_at_start'][0]:.2f}, "
             f"at end {m['load_average_at_end'][0]:.2f}; "
             f"commit {m['git_commit']}. Model: `{results['model']}`.", "",
             "| in process (`serving_default`) | value |", "| --- | --- |",
             f"| one image, p50 / p99 | {inproc['latency_p50_ms']:.2f} / {inproc['latency_p99_ms']:.2f} ms |"]
    lines += [f"| batch {b} | {rate:,.0f} images/s |" for b, rate in inproc["throughput"].items()]
    lines += ["", "| in process, batch | image graph alone | network alone (`predict_pixels`) "
              "| both (`serving_default`) | both / network |", "| --- | --- | --- | --- | --- |"]
    for batch, cells in results["graph_split"].items():
        shown = [f"{c['images_per_s']:,.0f} images/s ({c['us_per_image']:,.0f} us an image)"
                 for c in (cells["image_graph"], cells["network"], cells["both"])]
        ratio = cells["both"]["images_per_s"] / cells["network"]["images_per_s"]
        lines.append(f"| {batch} | {' | '.join(shown)} | {ratio:.0%} |")
    if results.get("reference"):
        ref = results["reference"]
        lines += ["", f"One image in process, alternating: this export {ref['ours_p50_ms']:.2f} ms p50, the reference "
                  f"`{ref['model']}` {ref['reference_p50_ms']:.2f} ms ({ref['ratio']:.2f}x)."]
    lines += ["", "| server | generator | concurrency | requests/s | p50 ms | p99 ms | errors | answers checked "
              "| server CPU ms/request | mean batch | load average |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    baseline = [{**results["baseline"], "api": "naive baseline (REST)"}] if results["baseline"] else []
    for c in [*results["server"], *baseline]:
        served = c["server_requests"] or c["requests"]
        cpu = c["server_cpu_s"] / served * 1000 if served else float("nan")
        lines.append(f"| {c['api']} | {c['generator']} | {c['concurrency']} | {c['rps']:,.0f} | {c['p50_ms']:.2f} | "
                     f"{c['p99_ms']:.2f} | {c['errors']} | {c['checked']:,} | {cpu:.2f} | {c['mean_batch']:.1f} | "
                     f"{c.get('load_average', 0):.1f} |")
    mem = results["memory"] or {}
    lines += [""]
    if mem:
        lines += [f"Memory (VmRSS of the server, c={mem['concurrency']} gRPC for {mem['seconds']:.0f} s, "
              f"{mem['requests']:,} requests, {mem['errors']} errors): idle {results['server_rss_idle_mb']:.0f} MB, "
              f"after warm-up {mem['rss_after_warmup_mb']:.0f} MB, end {mem['rss_end_mb']:.0f} MB, "
              f"max {mem['rss_max_mb']:.0f} MB, growth {mem['growth_mb']:+.1f} MB.", ""]
    lines += ["| load generator | CPU us/request | ceiling on one core (requests/s) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {g['cpu_us_per_request']:.0f} | {g['ceiling_rps_one_core']:,.0f} |"
              for name, g in results["generators"].items()]
    lines += ["", "| criterion | met |", "| --- | --- |"]
    lines += [f"| {name} | {'yes' if ok else 'n/a' if ok is None else 'NO'} |"
              for name, ok in results["criteria"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist"), help="base path or version directory")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a cell")
    parser.add_argument("--memory-seconds", type=float, default=60.0, help="0: skip the memory run")
    parser.add_argument("--concurrency", help="comma-separated, default 1,8,32,64")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument("--smoke", action="store_true", help="about a second a cell, concurrency 1 and 2")
    parser.add_argument("--no-c-generators", action="store_true",
                        help="use the Python clients even if h2load and wrk are installed")
    parser.add_argument("--batching-config", type=Path, default=Settings.batching_config)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for serving.server (repeat); later flags win over the thread flags")
    parser.add_argument("--server-root", type=Path, default=ROOT, help="run serving.server from this checkout")
    parser.add_argument("--image", type=Path, help="an image file to send (default: the model's first warmup image)")
    parser.add_argument("--reference", type=Path,
                        help="another export (base path or version) to time one image against, in this process")
    parser.add_argument("--out", type=Path, help="results as JSON here, the tables beside it as .table.md")
    args = parser.parse_args(argv)
    common = dict(batching_config=args.batching_config, server_args=(*SERVER_THREAD_FLAGS, *args.server_arg),
                  image=args.image,
                  use_c_generators=not args.no_c_generators, baseline=not args.no_baseline,
                  server_root=args.server_root, reference=args.reference)
    if args.concurrency:
        common["concurrency"] = tuple(int(c) for c in args.concurrency.split(","))
    if args.smoke:
        settings = Settings.smoke(args.model, **common)
    else:
        settings = Settings(args.model, duration=args.duration, memory_seconds=args.memory_seconds, **common)
    results = run(settings)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".table.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
