"""Closed-loop load generators: h2load (gRPC over HTTP/2), wrk (REST) and a Python fallback for each.

Every generator keeps exactly `concurrency` requests in flight for `duration` seconds against 127.0.0.1 and
returns a `Cell`. The C generators cost a few microseconds of CPU a request, the Python ones about 200 us,
so on a 2-core machine only the C ones can measure a fast server; the Python ones exist so the harness
still runs (and says so) where h2load and wrk are not installed.

How answers are checked under load: every request carries the same image, so every correct answer is the
same. wrk's Lua script checks each REST body for the expected digit. h2load sees only HTTP statuses (gRPC
errors travel as HTTP 200 with a grpc-status trailer), so a gRPC answer counts only if its bytes add up:
the DATA bytes h2load received must be exactly `answered x expected response size`; an error has no body.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

GRPC_PATH = "/tensorflow.serving.PredictionService/Predict"


@dataclass
class Cell:
    api: str  # "grpc" or "rest"
    generator: str  # "h2load", "wrk", "python"
    concurrency: int
    duration_s: float
    requests: int  # answers received
    errors: int  # failed requests and wrong answers
    checked: int  # answers whose content was checked
    rps: float
    p50_ms: float
    p99_ms: float
    generator_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    mean_batch: float = 0.0
    server_requests: int = 0  # what the server itself counted as answered in the cell, warm-up included
    load_average: float = 0.0  # the machine's 1-minute load average as the cell ended (the run's own load too)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def available(tool: str) -> bool:
    return shutil.which(tool) is not None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grpc_frame(request: predict_pb2.PredictRequest) -> bytes:
    """A gRPC message on the wire: 1 byte compressed flag, 4 bytes big-endian length, the message."""
    body = request.SerializeToString()
    return b"\0" + len(body).to_bytes(4, "big") + body


def h2load_grpc(port: int, request: predict_pb2.PredictRequest, response_bytes: int, concurrency: int,
                duration: float, workdir: Path, warmup: float = 1.0) -> Cell:
    """response_bytes: the size of one correct PredictResponse (without the 5-byte frame header)."""
    body, log = workdir / "grpc_request.bin", workdir / f"h2load_c{concurrency}.log"
    body.write_bytes(grpc_frame(request))
    # One connection carrying `concurrency` streams, as a gRPC channel does (a connection per stream costs the
    # server more CPU a request and is not how gRPC clients talk).
    command = ["h2load", "-c", "1", "-m", str(concurrency), "-t", "1", "-D", f"{duration:g}",
               *(["--warm-up-time", f"{warmup:g}"] if warmup else []),
               "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"--log-file={log}", f"http://127.0.0.1:{port}{GRPC_PATH}"]
    cpu = _children_cpu()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    cpu, out = _children_cpu() - cpu, finished.stdout
    if "requests:" not in out or not log.exists():
        raise RuntimeError(f"h2load failed:\n{out}{finished.stderr}")
    done = _int(r"requests: \d+ total, \d+ started, (\d+) done", out)
    failed = _int(r"(\d+) failed", out) + _int(r"(\d+) errored", out) + _int(r"(\d+) timeout", out)
    # Responses still in flight when the clock stops add their bytes without counting as done: round.
    answered = round(_int(r"traffic: .*?, [\d.]+\w*B \((\d+)\) data", out) / (response_bytes + 5))
    latencies = []
    for line in log.read_text().splitlines():
        _, status, elapsed = line.split("\t")[:3]
        if status == "200":
            latencies.append(int(elapsed) / 1000)
    short = max(0, done - answered - concurrency)  # answers without the right body: errors
    return Cell("grpc", "h2load", concurrency, duration, done - short, short + failed, done - short,
                (done - short) / duration, percentile(latencies, 50), percentile(latencies, 99), cpu)


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) good = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 and string.find(body, %(pattern)s) then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local good, bad = 0, 0
  for _, t in ipairs(threads) do good = good + t:get("good"); bad = bad + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %%d, "duration_us": %%d, "socket_errors": %%d, "status_errors": %%d, ' ..
    '"good": %%d, "bad": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    good, bad, latency:percentile(50), latency:percentile(99)))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_rest(port: int, model_name: str, body: bytes, digit: int, concurrency: int, duration: float,
             workdir: Path) -> Cell:
    script = workdir / "rest.lua"
    pattern = f'"digit":%s*{digit}[,}}%s]'
    script.write_text(_WRK_SCRIPT % {"body": _lua_string(body.decode()), "pattern": _lua_string(pattern)})
    command = ["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s", "--timeout", "10s",
               "-s", str(script), f"http://127.0.0.1:{port}/v1/models/{model_name}:predict"]
    cpu = _children_cpu()
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = _children_cpu() - cpu
    match = re.search(r"^BENCH (.*)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(match[1])
    seconds = r["duration_us"] / 1e6
    return Cell("rest", "wrk", concurrency, duration, r["good"], r["bad"] + r["socket_errors"], r["good"] + r["bad"],
                r["good"] / seconds, r["p50_us"] / 1000, r["p99_us"] / 1000, cpu)


def _closed_loop(concurrency: int, duration: float, call) -> tuple[list[float], int, int, float]:
    """Runs call() -> bool (answer correct) in `concurrency` threads; returns latencies (ms), good, bad, seconds."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    bad = [0] * concurrency
    stop = time.perf_counter() + duration

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                ok = call()
            except Exception:
                ok = False
            if ok:
                latencies[i].append((time.perf_counter() - started) * 1000)
            else:
                bad[i] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [x for per in latencies for x in per]
    return flat, len(flat), sum(bad), time.perf_counter() - started


def python_grpc(port: int, request: predict_pb2.PredictRequest, digit: int, concurrency: int,
                duration: float) -> Cell:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call() -> bool:
            response = stub.Predict(request, timeout=10)
            return _first_digit(response) == digit

        cpu = time.process_time()
        latencies, good, bad, seconds = _closed_loop(concurrency, duration, call)
        cpu = time.process_time() - cpu
    return Cell("grpc", "python", concurrency, duration, good, bad, good + bad, good / seconds,
                percentile(latencies, 50), percentile(latencies, 99), cpu)


def _first_digit(response: predict_pb2.PredictResponse) -> int:
    proto = response.outputs["digit"]
    if proto.tensor_content:
        return int.from_bytes(proto.tensor_content[:8], "little", signed=True)
    return proto.int64_val[0] if proto.int64_val else -1


def python_rest(port: int, model_name: str, body: bytes, digit: int, concurrency: int, duration: float) -> Cell:
    local = threading.local()

    def call() -> bool:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            local.conn.request("POST", f"/v1/models/{model_name}:predict", body,
                               {"Content-Type": "application/json"})
            response = local.conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            local.conn.close()
            del local.conn
            raise
        return response.status == 200 and json.loads(answer)["predictions"][0]["digit"] == digit

    cpu = time.process_time()
    latencies, good, bad, seconds = _closed_loop(concurrency, duration, call)
    cpu = time.process_time() - cpu
    return Cell("rest", "python", concurrency, duration, good, bad, good + bad, good / seconds,
                percentile(latencies, 50), percentile(latencies, 99), cpu)


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-"))


def _int(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    return int(match[1]) if match else 0


def _float(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match[1]) if match else 0.0
