"""Memory under repeated large requests: does the embedded server's resident memory plateau, and is it given back?

    python -m bench.soak --model models/mnist --rounds 40 --concurrency 8 --batching on --out docs/soak.json
    python -m bench.soak --model models/mnist --smoke          # a few rounds of small requests: checks that it works
    python -m bench.soak --report docs/soak.json                # the tables of every run stored there

The server runs as a subprocess (bench.serving's ServerProcess and server command: the Makefile's thread flags,
serving/batching.config when batching is on). Each round sends `--concurrency` requests at once, each about
12 MB of encoded images, alternately over REST and gRPC, and waits for every answer. The requests are noise:
PNGs of 1300-1600 px (RGB and grey), JPEGs (4:4:4, quality 95) of 1000-2000 px, and GIFs of several frames,
all within the server's bounds (16 MB a message, base64 and JSON included for REST; 4096 px a side; the
pixels a request may declare). After each round the server's VmRSS, VmHWM (its peak) and RssAnon are read from
/proc, again after a short pause, and after the last round once more after a longer idle period.

An answer is right if it is a digit for every image (HTTP 200 / OK) or a 400 / INVALID_ARGUMENT (noise may be
"no ink found"); a 5xx, any other gRPC code, a timeout or a dead server is an error. The server's own
request counters must agree. The plateau test: the least-squares slope of RSS after the pause, over the last
half of the rounds, in MB per round, is at most --max-slope.

The fixes the soak found now live in serving/ (docs/soak.md has the runs before and after): a refused
request leaves no reference cycle (serving/batching.py, serving/grpc_service.py), and the heap that large
requests freed is given back once a burst of them is over (serving/memory.py). The launcher that patched them
into the server for the first measurements no longer does; it remains for --mallopt and --probe. Other
server settings can still be tried without touching serving/:
- `--server-env KEY=VALUE`: the server's environment (MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=1048576,
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2, ...);
- `--mallopt M_MMAP_THRESHOLD=1048576` runs the server through this module's launcher (`python -m bench.soak
  serve <server flags>`), which calls glibc's mallopt() before TensorFlow loads;
- `--probe` runs it through the launcher with tracemalloc on and, after each round, records the Python heap
  (what tracemalloc traces, the lines that grew most since the first round) and glibc's own accounts
  (mallinfo2: bytes in use, free bytes its arenas keep, bytes in mmapped chunks); `--server-env
  SOAK_PROBE_GC=1` also runs gc.collect() there and reports what it freed.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import http.client
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from bench import serving as bench_serving
from bench.serving import MODEL_NAME, SERVER_THREAD_FLAGS, ServerProcess, machine, sample_image, version_dir
from serving.rest import MAX_BODY_BYTES
from training.preprocessing import MAX_CALL_PIXELS, MAX_SIDE

PAYLOAD_BYTES = 12_000_000  # encoded image bytes a request: base64 makes 16.0 MB of a REST body, under 16 MiB
MAX_SLOPE_MB_PER_ROUND = 5.0  # "plateau": RSS over the last half of the rounds rises at most this much a round
KINDS = ("png", "jpeg", "gif")
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")
PROBE_FILE_ENV, MALLOPT_ENV = "SOAK_PROBE_FILE", "SOAK_MALLOPT"
# glibc's mallopt() parameters (malloc.h)
MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3, "M_MMAP_MAX": -4,
                  "M_ARENA_TEST": -7, "M_ARENA_MAX": -8}


@dataclass
class Settings:
    model: Path
    rounds: int = 40
    concurrency: int = 8
    batching: bool = True
    payload_bytes: int = PAYLOAD_BYTES
    png_sides: tuple[int, int] = (1300, 1600)
    jpeg_sides: tuple[int, int] = (1000, 2000)
    gif_sides: tuple[int, int] = (1000, 1400)
    variants: int = 0  # distinct payloads, cycled through; 0: two a request slot
    pause: float = 2.0  # seconds after each round before RSS is read again
    idle: float = 30.0  # seconds of idling after the last round
    timeout: float = 600.0  # a request's deadline
    max_slope: float = MAX_SLOPE_MB_PER_ROUND
    server_env: dict[str, str] = field(default_factory=dict)
    server_args: tuple[str, ...] = ()
    mallopt: dict[str, int] = field(default_factory=dict)
    probe: bool = False
    seed: int = 0
    label: str = ""
    progress: Callable[[str], None] = field(default=lambda message: print(f"[soak] {message}", flush=True))

    @classmethod
    def smoke(cls, model: Path, **overrides) -> Settings:
        """Three rounds of two small requests: proves the harness works, measures nothing."""
        values = dict(rounds=3, concurrency=2, payload_bytes=300_000, png_sides=(120, 360), jpeg_sides=(120, 360),
                      gif_sides=(100, 200), variants=3, pause=0.2, idle=1.0, timeout=60.0)
        values.update(overrides)
        return cls(model, **values)

    def describe(self) -> str:
        parts = [f"batching {'on' if self.batching else 'off'}"]
        parts += [f"{key}={value}" for key, value in self.server_env.items()]
        parts += [f"mallopt({key}, {value})" for key, value in self.mallopt.items()]
        if self.probe:
            parts.append("probe")
        parts += list(self.server_args)
        return ", ".join(parts)


# ---- payloads -------------------------------------------------------------------------------------------------

@dataclass
class Payload:
    kind: str
    images: list[bytes]
    shapes: list[list[int]]  # per image [width, height] ([frames, width, height] for a GIF)
    rest_body: bytes = b""
    grpc_request: predict_pb2.PredictRequest | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(image) for image in self.images)

    def declared_pixels(self) -> int:
        return sum(math.prod(shape[-2:]) for shape in self.shapes)

    def describe(self) -> dict:
        return {"kind": self.kind, "images": len(self.images), "bytes": self.nbytes, "rest_body_bytes":
                len(self.rest_body), "shapes": self.shapes}


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def _noise(rng: np.random.Generator, width: int, height: int, channels: int) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _fill(rng: np.random.Generator, room: int, sides: tuple[int, int], bytes_per_pixel: float, encode) -> tuple:
    """Images of random sides in `sides` (smaller ones at the end) until `room` bytes are nearly used.
    encode(width, height) -> bytes. Returns (images, shapes)."""
    images, shapes = [], []
    smallest = max(16, sides[0] // 8)
    while True:
        left = room - sum(map(len, images))
        width, height = (int(s) for s in rng.integers(sides[0], sides[1] + 1, 2))
        fits = math.sqrt(left / bytes_per_pixel / (width * height))
        if fits < 1:  # the last image: as large as the room left allows
            width, height = int(width * fits * 0.97), int(height * fits * 0.97)
        while width >= smallest and height >= smallest:
            data = encode(width, height)
            if len(data) <= left:
                images.append(data)
                shapes.append([width, height])
                break
            width, height = int(width * 0.9), int(height * 0.9)
        else:
            return images, shapes
        if fits < 1:
            return images, shapes


def make_payload(kind: str, rng: np.random.Generator, settings: Settings) -> Payload:
    room = settings.payload_bytes
    if kind == "png":  # RGB and grey noise, 3 and 1 byte a pixel: PNG cannot compress it
        channels = int(rng.choice([3, 1]))
        images, shapes = _fill(rng, room, settings.png_sides, float(channels),
                               lambda w, h: _encode(_noise(rng, w, h, channels), "PNG", compress_level=1))
    elif kind == "jpeg":  # no chroma subsampling, quality 95: about 2.4 bytes a pixel of noise
        images, shapes = _fill(rng, room, settings.jpeg_sides, 2.4,
                               lambda w, h: _encode(_noise(rng, w, h, 3), "JPEG", quality=95, subsampling=0))
    elif kind == "gif":  # one GIF of several noise frames, about 1.4 bytes a pixel
        low, high = settings.gif_sides
        side = int(rng.integers(low, high + 1))
        frames = max(2, min(int(room / (1.4 * side * side)), MAX_SIDE * MAX_SIDE // (side * side)))
        while True:
            pictures = [Image.fromarray(_noise(rng, side, side, 1)).convert("P") for _ in range(frames)]
            out = io.BytesIO()
            pictures[0].save(out, "GIF", save_all=True, append_images=pictures[1:])
            if out.tell() <= room or frames <= 2:
                break
            frames -= 1
        images, shapes = [out.getvalue()], [[frames, side, side]]
    else:
        raise ValueError(f"unknown payload kind {kind}")
    payload = Payload(kind, images, shapes)
    payload.rest_body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}).encode()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    tensor = request.inputs["image_bytes"]
    tensor.dtype = 7  # DT_STRING
    tensor.tensor_shape.dim.add(size=len(images))
    tensor.string_val.extend(images)
    payload.grpc_request = request
    if (len(payload.rest_body) > MAX_BODY_BYTES or request.ByteSize() > MAX_BODY_BYTES
            or payload.declared_pixels() > MAX_CALL_PIXELS or max(max(s[-2:]) for s in shapes) > MAX_SIDE):
        raise ValueError(f"payload out of the server's bounds: {payload.describe()}")
    return payload


def make_payloads(settings: Settings) -> list[Payload]:
    rng = np.random.default_rng(settings.seed)
    count = settings.variants or 2 * settings.concurrency
    return [make_payload(KINDS[i % len(KINDS)], rng, settings) for i in range(count)]


# ---- answers --------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    api: str
    kind: str
    result: str  # "digit", "invalid" (400 / INVALID_ARGUMENT) or "error"
    detail: str
    seconds: float


def rest_outcome(status: int, body: bytes, images: int) -> tuple[str, str]:
    """("digit" | "invalid" | "error", detail) for a REST answer to a request of `images` images."""
    try:
        answer = json.loads(body)
    except ValueError:
        return "error", f"HTTP {status}, not JSON: {body[:200]!r}"
    if status == 200:
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        digits = [p.get("digit") for p in predictions or [] if isinstance(p, dict)]
        if len(digits) != images or not all(isinstance(d, int) and 0 <= d <= 9 for d in digits):
            return "error", f"HTTP 200 without a digit for each of {images} images: {str(answer)[:200]}"
        return "digit", ",".join(map(str, digits))
    message = answer.get("error", "") if isinstance(answer, dict) else ""
    if status == 400 and message:
        return "invalid", message[:120]
    return "error", f"HTTP {status}: {str(answer)[:200]}"


def grpc_outcome(response: predict_pb2.PredictResponse | None, error: grpc.RpcError | None,
                 images: int) -> tuple[str, str]:
    if error is not None:
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return "invalid", (error.details() or "")[:120]
        return "error", f"{error.code().name}: {(error.details() or '')[:200]}"
    digits = tf.make_ndarray(response.outputs["digit"]).ravel().tolist() if "digit" in response.outputs else []
    if len(digits) != images or not all(0 <= int(d) <= 9 for d in digits):
        return "error", f"OK without a digit for each of {images} images: {digits[:10]}"
    return "digit", ",".join(str(int(d)) for d in digits)


def send_rest(port: int, payload: Payload, timeout: float) -> tuple[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/models/{MODEL_NAME}:predict", payload.rest_body,
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return rest_outcome(answer.status, answer.read(), len(payload.images))
    except (OSError, http.client.HTTPException) as e:
        return "error", f"REST connection: {type(e).__name__}: {e}"
    finally:
        conn.close()


def send_grpc(stub, payload: Payload, timeout: float) -> tuple[str, str]:
    try:
        return grpc_outcome(stub.Predict(payload.grpc_request, timeout=timeout), None, len(payload.images))
    except grpc.RpcError as e:
        return grpc_outcome(None, e, len(payload.images))


# ---- the server ------------------------------------------------------------------------------------------------

def read_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile in MB and Threads, from /proc/<pid>/status; {} once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            number = int(value.split()[0])
            found[key] = number if key == "Threads" else round(number / 1024, 1)
    return found


def server_command(base: Path, settings: Settings, probe_file: Path | None) -> tuple[list[str], dict[str, str]]:
    """bench.serving's server command (batching per serving/batching.config, the Makefile's thread flags), with
    batching turned off if asked, run through this module's launcher (`serve`) for --mallopt and --probe,
    and the environment variables it gets on top of this process's."""
    args = (*SERVER_THREAD_FLAGS, *settings.server_args)
    command = bench_serving.server_command(base, bench_serving.Settings(settings.model, server_args=args),
                                           batching=settings.batching)
    env = dict(settings.server_env)
    if settings.probe or settings.mallopt:
        command[1:3] = ["-m", "bench.soak", "serve"]
        if settings.mallopt:
            env[MALLOPT_ENV] = ",".join(f"{key}={value}" for key, value in settings.mallopt.items())
        if settings.probe:
            env[PROBE_FILE_ENV] = str(probe_file)
    return command, env


def start(command: list[str], env: dict[str, str], wait: bool = True) -> ServerProcess:
    # `env` execs the server in its own place: the pid ServerProcess samples is the server's
    return ServerProcess([*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *command], wait=wait)


def probe(server: ServerProcess, probe_file: Path, seq: int, timeout: float = 120.0) -> dict:
    """Asks the launcher (SIGUSR1) for its accounts and waits for them."""
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            report = json.loads(probe_file.read_text())
            if report.get("seq", 0) >= seq:
                return report
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return {"error": "no probe report"}


# ---- the soak --------------------------------------------------------------------------------------------------

class Sampler:
    """VmRSS every quarter second while the soak runs: the peak of each round."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self.started = pid, [], time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = read_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((round(time.monotonic() - self.started, 2), rss))
            self._stop.wait(0.25)

    def peak_since(self, t: float) -> float:
        return max((rss for at, rss in self.samples if at >= t), default=float("nan"))

    def now(self) -> float:
        return time.monotonic() - self.started

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def slope(values: list[float]) -> float | None:
    """Least-squares MB per step of `values`; None for fewer than two."""
    if len(values) < 2:
        return None
    return float(np.polyfit(np.arange(len(values)), np.array(values), 1)[0])


def summarise(result: dict, settings: Settings) -> dict:
    rounds = result["rounds"]
    after = [r["rss_after_pause_mb"] for r in rounds if r["rss_after_pause_mb"] is not None]
    half = after[len(after) // 2:]
    last_half_slope = slope(half) if len(rounds) >= 4 else None
    outcomes = Counter()
    for r in rounds:
        outcomes.update(r["answers"])
    server_errors = {key: count for key, count in result["server_counts"].items()
                     if not key.endswith(("/OK", "/INVALID_ARGUMENT"))}
    final = result["final_check"]
    answers_ok = (outcomes["error"] == 0 and not server_errors and result["server_alive"]
                  and result["server_exit_code"] == 0
                  and all(v.get("result") == "digit" for v in final.values()) and bool(final))
    samples = [rss for _, rss in result["samples"]] + [result.get("rss_max_sampled_mb") or 0]
    cpu = [r["server_cpu_s"] for r in rounds if not math.isnan(r.get("server_cpu_s", math.nan))]
    return {
        "rss_start_mb": result["rss_start"].get("VmRSS"),
        "rss_round1_mb": after[0] if after else None,
        "rss_plateau_mb": statistics.median(half) if half else None,
        "rss_last_mb": after[-1] if after else None,
        "rss_max_mb": max(samples, default=None),
        "hwm_mb": result["rss_end"].get("VmHWM"),
        "rss_after_idle_mb": result["rss_after_idle"].get("VmRSS"),
        "slope_last_half_mb_per_round": None if last_half_slope is None else round(last_half_slope, 2),
        "growth_last_half_mb": round(half[-1] - half[0], 1) if len(half) >= 2 else None,
        "max_slope_mb_per_round": settings.max_slope,
        "plateau": None if last_half_slope is None else last_half_slope <= settings.max_slope,
        "requests": sum(outcomes.values()), "digits": outcomes["digit"], "invalid": outcomes["invalid"],
        "errors": outcomes["error"], "server_errors": server_errors, "answers_ok": answers_ok,
        "seconds": round(result["seconds"], 1),
        "server_cpu_ms_per_request": round(sum(cpu) / sum(outcomes.values()) * 1000) if cpu and outcomes else None,
    }


def run_round(pool: futures.ThreadPoolExecutor, ports: dict, stubs: list, payloads: list[Payload], number: int,
              settings: Settings) -> list[Outcome]:
    def one(slot: int) -> Outcome:
        payload = payloads[(number * settings.concurrency + slot) % len(payloads)]
        api = ("rest", "grpc")[(number + slot) % 2]
        started = time.monotonic()
        if api == "rest":
            result, detail = send_rest(ports["rest_port"], payload, settings.timeout)
        else:
            result, detail = send_grpc(stubs[slot], payload, settings.timeout)
        return Outcome(api, payload.kind, result, detail, time.monotonic() - started)

    return list(pool.map(one, range(settings.concurrency)))


def final_check(ports: dict, stub, image: bytes, timeout: float) -> dict:
    """One real digit over each API once the soak is over: the server still answers."""
    payload = Payload("sample", [image], [])
    payload.rest_body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    payload.grpc_request = bench_serving.predict_request(image)
    checks = {}
    for api, send in (("rest", lambda: send_rest(ports["rest_port"], payload, timeout)),
                      ("grpc", lambda: send_grpc(stub, payload, timeout))):
        result, detail = send()
        checks[api] = {"result": result, "detail": detail}
    return checks


def soak(settings: Settings) -> dict:
    version = version_dir(settings.model)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    base = workdir / "base"
    base.mkdir()
    (base / "1").symlink_to(version.resolve())
    probe_file = workdir / "probe.json"
    command, env = server_command(base, settings, probe_file)
    settings.progress(f"starting the server ({settings.describe()})")
    started = time.monotonic()
    server = start(command, env, wait=False)  # it loads while the payloads are made
    stubs, channels, sampler = [], [], None
    serving_changes = subprocess.run(["git", "status", "--porcelain", "serving"], cwd=bench_serving.ROOT,
                                     capture_output=True, text=True).stdout.split("\n")
    result: dict = {"label": settings.label or settings.describe(), "setting": settings.describe(),
                    "machine": machine(), "serving_uncommitted": [line for line in serving_changes if line],
                    "model": str(version.resolve()), "server_command": command,
                    "server_env": env,
                    "settings": {"rounds": settings.rounds, "concurrency": settings.concurrency,
                                 "batching": settings.batching, "payload_bytes": settings.payload_bytes,
                                 "pause_s": settings.pause, "idle_s": settings.idle, "seed": settings.seed,
                                 "mallopt": settings.mallopt, "probe": settings.probe},
                    "rounds": []}
    try:
        settings.progress(f"making {settings.variants or 2 * settings.concurrency} payloads of "
                          f"{settings.payload_bytes / 1e6:.1f} MB")
        payloads = make_payloads(settings)
        result["payloads"] = [p.describe() for p in payloads]
        image = sample_image(version)
        server.wait_ready()
        pid = server.proc.pid
        time.sleep(settings.pause)
        result["rss_start"] = read_status(pid)
        sampler = Sampler(pid)
        channels = [grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_port']}",
                                          options=[("grpc.max_send_message_length", MAX_BODY_BYTES)])
                    for _ in range(settings.concurrency)]
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
        with futures.ThreadPoolExecutor(settings.concurrency) as pool:
            for number in range(settings.rounds):
                begun, t0, cpu = time.monotonic(), sampler.now(), server.cpu_seconds()
                outcomes = run_round(pool, server.ports, stubs, payloads, number, settings)
                seconds = time.monotonic() - begun
                right_after = read_status(pid)
                cpu = server.cpu_seconds() - cpu if server.proc.poll() is None else float("nan")
                time.sleep(settings.pause)
                after_pause = read_status(pid)
                if not after_pause:
                    outcomes.append(Outcome("-", "-", "error", "the server died", 0.0))
                record = {
                    "round": number + 1, "seconds": round(seconds, 2), "server_cpu_s": round(cpu, 2),
                    "rss_mb": right_after.get("VmRSS"), "rss_after_pause_mb": after_pause.get("VmRSS"),
                    "peak_rss_mb": sampler.peak_since(t0), "hwm_mb": after_pause.get("VmHWM"),
                    "anon_mb": after_pause.get("RssAnon"), "threads": after_pause.get("Threads"),
                    "answers": dict(Counter(o.result for o in outcomes)),
                    "slowest_s": round(max(o.seconds for o in outcomes), 2),
                    "errors": [o.__dict__ for o in outcomes if o.result == "error"][:5],
                    "invalid_messages": sorted({o.detail for o in outcomes if o.result == "invalid"})[:3],
                }
                if settings.probe and after_pause:
                    record["probe"] = probe(server, probe_file, number + 1)
                result["rounds"].append(record)
                settings.progress(
                    f"round {number + 1}/{settings.rounds}: {seconds:.1f} s, RSS {record['rss_mb']} MB, after "
                    f"{settings.pause:g} s {record['rss_after_pause_mb']} MB, peak {record['peak_rss_mb']} MB, "
                    f"answers {record['answers']}")
                if not after_pause:
                    break
        idle = []
        idle_end = time.monotonic() + settings.idle
        while time.monotonic() < idle_end and server.proc.poll() is None:
            time.sleep(min(1.0, max(0.0, idle_end - time.monotonic())))
            idle.append(read_status(pid).get("VmRSS"))
        result["idle_samples_mb"] = idle
        result["rss_after_idle"] = read_status(pid)
        result["server_alive"] = server.proc.poll() is None
        result["final_check"] = final_check(server.ports, stubs[0], image, settings.timeout) \
            if result["server_alive"] else {}
        result["server_counts"] = {k: v for k, v in server.counters().items() if "/" in k} \
            if result["server_alive"] else {}
        result["rss_end"] = read_status(pid)
    finally:
        if sampler:
            sampler.stop()
            result["rss_max_sampled_mb"] = max((rss for _, rss in sampler.samples), default=None)
            result["samples"] = sampler.samples[::4]  # one a second is enough for a curve
        for channel in channels:
            channel.close()
        result["server_died"] = server.proc.poll() is not None
        server.stop()
        result["server_exit_code"] = server.proc.returncode  # 0: it drained and stopped at SIGTERM
        result["server_log_tail"] = [line.rstrip() for line in server.lines[-20:]]
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = time.monotonic() - started
    result["summary"] = summarise(result, settings)
    return result


# ---- reports --------------------------------------------------------------------------------------------------

def _mb(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.0f}"


def table(run: dict) -> str:
    s = run["summary"]
    lines = [f"### {run['label']}", "",
             f"{run['settings']['rounds']} rounds of {run['settings']['concurrency']} concurrent requests of "
             f"{run['settings']['payload_bytes'] / 1e6:.1f} MB; {s['seconds']:.0f} s; server RSS before the first "
             f"request {_mb(s['rss_start_mb'])} MB.", "",
             "| round | seconds | server CPU s | RSS after round (MB) | after pause | peak in round | VmHWM | anon | "
             "digits / 400 / errors |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run["rounds"]:
        a = r["answers"]
        cpu = r.get("server_cpu_s")
        lines.append(f"| {r['round']} | {r['seconds']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} | "
                     f"{_mb(r['rss_mb'])} | {_mb(r['rss_after_pause_mb'])} | "
                     f"{_mb(r['peak_rss_mb'])} | {_mb(r['hwm_mb'])} | {_mb(r['anon_mb'])} | "
                     f"{a.get('digit', 0)} / {a.get('invalid', 0)} / {a.get('error', 0)} |")
    slope_text = "n/a" if s["slope_last_half_mb_per_round"] is None else f"{s['slope_last_half_mb_per_round']:+.1f}"
    plateau = {True: "yes", False: "NO", None: "n/a (fewer than 4 rounds)"}[s["plateau"]]
    final = ", ".join(f"{api} {check['result']}" for api, check in run["final_check"].items()) or "-"
    lines += ["", f"RSS start {_mb(s['rss_start_mb'])} MB, after round 1 {_mb(s['rss_round1_mb'])} MB, plateau "
              f"(median of the last half) {_mb(s['rss_plateau_mb'])} MB, max {_mb(s['rss_max_mb'])} MB (VmHWM "
              f"{_mb(s['hwm_mb'])}), after {run['settings']['idle_s']:g} s idle {_mb(s['rss_after_idle_mb'])} MB. "
              f"Last half: {slope_text} MB/round, plateau: {plateau}. Answers: {s['digits']} digits, "
              f"{s['invalid']} 400s, {s['errors']} errors (server CPU "
              f"{_mb(s.get('server_cpu_ms_per_request'))} ms a request), "
              f"server-side failures {s['server_errors'] or 'none'}, "
              f"after the soak {final}: "
              f"{'right' if s['answers_ok'] else 'WRONG'}."]
    return "\n".join(lines) + "\n"


def comparison(runs: list[dict]) -> str:
    """RSS after the pause, per round, one column per run."""
    lines = ["| round | " + " | ".join(r["label"] for r in runs) + " |", "| --- |" + " --- |" * len(runs)]
    lines.append("| before | " + " | ".join(_mb(r["summary"]["rss_start_mb"]) for r in runs) + " |")
    for i in range(max(len(r["rounds"]) for r in runs)):
        lines.append(f"| {i + 1} | " + " | ".join(_mb(r["rounds"][i]["rss_after_pause_mb"]) if i < len(r["rounds"])
                                                  else "" for r in runs) + " |")
    lines.append("| idle | " + " | ".join(_mb(r["summary"]["rss_after_idle_mb"]) for r in runs) + " |")
    for name, key in (("plateau", "rss_plateau_mb"), ("max", "rss_max_mb"), ("VmHWM", "hwm_mb")):
        lines.append(f"| {name} | " + " | ".join(_mb(r["summary"][key]) for r in runs) + " |")
    lines.append("| server CPU ms/request | " + " | ".join(_mb(r["summary"].get("server_cpu_ms_per_request"))
                                                         for r in runs) + " |")
    lines.append("| MB/round, last half | " + " | ".join(
        "n/a" if r["summary"]["slope_last_half_mb_per_round"] is None
        else f"{r['summary']['slope_last_half_mb_per_round']:+.1f}" for r in runs) + " |")
    return "\n".join(lines) + "\n"


def slim(run: dict) -> dict:
    """What docs/soak.json keeps of a run: everything but the server's log (unless something failed), the
    first round's message of a 400, and of the probe the figures, not the collector's statistics."""
    run = dict(run)
    if run["summary"]["answers_ok"]:
        run.pop("server_log_tail", None)
    rounds = []
    for record in run["rounds"]:
        record = {key: value for key, value in record.items() if value or key not in ("errors", "invalid_messages")}
        if record.get("invalid_messages"):  # the first round's says what they are
            record["invalid_messages"] = record["invalid_messages"][:1]
            if rounds:
                del record["invalid_messages"]
        if "gc_stats" in record.get("probe", {}):
            probe = {key: value for key, value in record["probe"].items() if key != "gc_stats"}
            probe["full_collections"] = record["probe"]["gc_stats"][2]["collections"]
            record["probe"] = probe
        rounds.append(record)
    run["rounds"] = rounds
    return run


def store(out: Path, run: dict) -> None:
    """The file holds every setting's run, keyed by label (a run replaces the one of the same label), one run a
    line."""
    runs = []
    if out.exists():
        runs = [r for r in json.loads(out.read_text()).get("runs", []) if r["label"] != run["label"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(slim(r), separators=(",", ":")) for r in [*runs, run])
    out.write_text('{"runs": [\n' + lines + "\n]}\n")


# ---- the launcher: the server with mallopt() before TensorFlow loads, or probed -------------------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def serve(argv: list[str]) -> int:
    """serving.server.main(argv), with glibc's mallopt() called first ($SOAK_MALLOPT) and, with
    $SOAK_PROBE_FILE, tracemalloc on and accounts written to that file at each SIGUSR1."""
    libc = ctypes.CDLL("libc.so.6")
    for item in filter(None, os.environ.get(MALLOPT_ENV, "").split(",")):  # before TensorFlow loads
        key, value = item.split("=")
        if not libc.mallopt(MALLOPT_PARAMS[key], int(value)):
            raise RuntimeError(f"mallopt({key}, {value}) failed")
    probe_file = os.environ.get(PROBE_FILE_ENV)
    if probe_file:
        import tracemalloc

        tracemalloc.start(1)
    from serving import server

    if probe_file:
        libc.mallinfo2.restype = _Mallinfo2
        state = {"seq": 0, "first": None}

        def report(signum, frame) -> None:
            import gc
            import tracemalloc

            snapshot = tracemalloc.take_snapshot()
            state["first"] = state["first"] or snapshot
            grown = snapshot.compare_to(state["first"], "lineno")[:8]
            info = libc.mallinfo2()
            traced = tracemalloc.get_traced_memory()[0]
            collected = gc.collect() if os.environ.get("SOAK_PROBE_GC") else None
            state["seq"] += 1
            Path(probe_file).write_text(json.dumps({
                "seq": state["seq"],
                "python_traced_mb": round(traced / 1e6, 1),
                "gc_collected": collected,
                "python_traced_after_gc_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 1),
                "gc_counts": gc.get_count(), "gc_stats": gc.get_stats(),
                "python_grown": [f"{stat.size_diff / 1e6:+.2f} MB {stat.count_diff:+d} blocks "
                                 f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}" for stat in grown],
                "glibc": {"arena_mb": round(info.arena / 1e6, 1), "in_use_mb": round(info.uordblks / 1e6, 1),
                          "free_in_arenas_mb": round(info.fordblks / 1e6, 1),
                          "mmapped_mb": round(info.hblkhd / 1e6, 1), "mmapped_chunks": info.hblks,
                          "top_releasable_mb": round(info.keepcost / 1e6, 1)},
                "threads": threading.active_count(),
            }))

        signal.signal(signal.SIGUSR1, report)
    return server.main(argv)


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist"), help="base path or version directory")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--batching", choices=("on", "off"), default="on")
    parser.add_argument("--payload-mb", type=float, help=f"encoded MB a request (default {PAYLOAD_BYTES / 1e6:g})")
    parser.add_argument("--pause", type=float, help="seconds after each round before RSS is read again (2)")
    parser.add_argument("--idle", type=float, help="seconds of idling after the last round (30)")
    parser.add_argument("--max-slope", type=float, default=MAX_SLOPE_MB_PER_ROUND,
                        help="MB a round that RSS may still rise over the last half of the rounds")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the server (repeat), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for serving.server (repeat)")
    parser.add_argument("--mallopt", action="append", default=[], metavar="PARAM=VALUE",
                        help="launch the server with glibc's mallopt(PARAM, VALUE) called before TensorFlow loads "
                             f"(repeat; PARAM one of {', '.join(MALLOPT_PARAMS)})")
    parser.add_argument("--probe", action="store_true",
                        help="tracemalloc and glibc's mallinfo2 in the server after each round (slows it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="the run's name in the JSON and tables")
    parser.add_argument("--smoke", action="store_true", help="3 rounds of 2 requests of 0.3 MB")
    parser.add_argument("--out", type=Path, help="add the run to this JSON file (replacing one of the same label)")
    parser.add_argument("--report", type=Path, help="print the tables of the runs in this JSON file and exit")
    args = parser.parse_args(argv)
    if args.report:
        runs = json.loads(args.report.read_text())["runs"]
        print("\n".join(table(run) for run in runs))
        print(comparison(runs))
        return 0
    env = dict(item.split("=", 1) for item in args.server_env)
    if any(item.split("=")[0] not in MALLOPT_PARAMS for item in args.mallopt):
        parser.error(f"--mallopt: PARAM=VALUE with PARAM one of {', '.join(MALLOPT_PARAMS)}")
    overrides = {key: value for key, value in dict(
        rounds=args.rounds, concurrency=args.concurrency, pause=args.pause, idle=args.idle,
        payload_bytes=None if args.payload_mb is None else int(args.payload_mb * 1e6)).items() if value is not None}
    common = dict(batching=args.batching == "on", max_slope=args.max_slope, server_env=env,
                  server_args=tuple(args.server_arg),
                  mallopt={key: int(value) for key, value in (item.split("=") for item in args.mallopt)},
                  probe=args.probe, seed=args.seed, label=args.label, **overrides)
    settings = Settings.smoke(args.model, **common) if args.smoke else Settings(args.model, **common)
    run = soak(settings)
    print(table(run))
    if args.out:
        store(args.out, run)
    return 0 if run["summary"]["answers_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
