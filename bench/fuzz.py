"""Fuzzing the embedded server with hostile input: REST JSON, gRPC protobuf and image bytes, bounded in time.

    python -m bench.fuzz --model models/mnist --duration 120 --out docs/fuzz.json [--seed N]
    python -m bench.fuzz --model models/mnist --smoke        # 300 cases, batching on: proves it all works

The server runs as a subprocess (`python -m serving.server`, loopback, free ports, the Makefile's thread flags),
with batching on (serving/batching.config) for the first half of the time and off for the second, a new
server each (`--batching on|off|both`). hypothesis generates the cases (seeded by `--seed`; bulky random bytes
come from a `random.Random` it seeds), the three families in turn, 30 cases at a time, sent by
`--concurrency` threads:
- rest: valid JSON bodies of :predict (both signatures, row and columnar) and of :classify (with and without a
  context) mutated (wrong types, deep nesting,
  huge integers, NaN, lone surrogates, bad base64, wrong shapes, missing and extra keys, broken encodings),
  random bytes as a body, API paths mutated (model names, versions, labels, verbs), other methods, odd
  headers (Content-Length, Transfer-Encoding, Expect, long and many headers, HTTP versions), and raw
  garbage on the socket. A request whose framing is exact is followed by a valid one on the same connection
  when the server keeps it open: that one must be answered 200.
- grpc: generated requests of every PredictionService and ModelService method (TensorProtos of any dtype,
  shapes that disagree with the values, random string_val, versions and labels, odd model and input
  names, output filters; tf.Examples for Classify and MultiInference, in a context or not, with the image in
  the right feature, another one or none), valid requests with flipped bits, random bytes as the serialized
  request, other messages' bytes, unknown methods, and raw bytes on the gRPC port.
- image: MNIST digits encoded by Pillow (PNG in eight modes, JPEG, GIF, BMP, WebP, and TIFF, ICO, PPM, TGA)
  with bits flipped, bytes set to boundary values, truncated, spliced, chunks duplicated or inflated, size
  fields in the headers changed; sent in Predict over both protocols, alone and in batches, with valid
  digits among them. Unmutated digits (controls) must get the answer the server gave before the run.

An answer is fine when it is HTTP < 500, 501 (a verb or method the server does not implement) or 505 (an HTTP
version it does not speak), or a gRPC status among FINE_GRPC_CODES; an OK answer to a Predict must hold one
digit (0-9) per image. Failures: any other 5xx, gRPC INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED...,
no answer (reset, closed or timeout) where one is due, a malformed or wrong answer, the valid request after a
kept-alive one not answered 200, a traceback in the server's log, the server dying, and memory: VmHWM is read
after every case, and a jump of more than --spike-mb (256: a 4096 px image, the largest allowed, costs under
80) has the cases then in flight replayed one by one, alone, after the run: a failure when one input alone
costs that much (memory one replay leaves held can hide what the next costs); RSS at the end may not exceed
the median RSS of the run's second quarter (after warm-up) by more than --max-growth-mb. Each failure keeps
its input (base64 up to 16 KB, else its first bytes and a SHA-256). At the end the server must still answer
every control digit, over gRPC and REST, as it did at the start.

`--duration` is the fuzzing time, split between the phases; each phase's server start (10-30 s), its checks
and replays come on top. The server runs with its address space limited to --address-space-mb (a case that
asks it for more memory than that fails inside the server instead of taking the machine's). Exit code 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import io
import json
import math
import os
import queue
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)

from bench import soak
from bench.serving import ServerProcess, machine, version_dir

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "mnist"
FEATURE = "image/encoded"  # the tf.Example feature of the classification signature
FAMILIES = ("rest", "grpc", "image")
SERVER_FLAGS = ("--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=-1")  # the Makefile's
METRICS_PATH = "/monitoring/prometheus/metrics"  # as in serving/monitoring.config
MAX_BODY_BYTES = 16 * 1024 * 1024  # the server's limit (serving.rest.MAX_BODY_BYTES), for bodies declared above it

FINE_GRPC_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                   "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}
FINE_HTTP_5XX = {501, 505}  # UNIMPLEMENTED (as TF Serving maps it) and "HTTP Version Not Supported"
SLOW_SECONDS = 5.0
KEEP_INPUT_BYTES = 16 * 1024  # a failing input up to this size is kept whole (base64) in the summary

PREDICTION = "/tensorflow.serving.PredictionService/"
MODEL_SERVICE = "/tensorflow.serving.ModelService/"
GRPC_METHODS = {
    PREDICTION + "Predict": predict_pb2.PredictRequest,
    PREDICTION + "Classify": classification_pb2.ClassificationRequest,
    PREDICTION + "Regress": regression_pb2.RegressionRequest,
    PREDICTION + "MultiInference": inference_pb2.MultiInferenceRequest,
    PREDICTION + "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataRequest,
    MODEL_SERVICE + "GetModelStatus": get_model_status_pb2.GetModelStatusRequest,
    MODEL_SERVICE + "HandleReloadConfigRequest": model_management_pb2.ReloadConfigRequest,
}


# ----------------------------------------------------------------------------------------------- cases, outcomes

@dataclass
class Case:
    family: str  # rest | grpc | image
    kind: str  # what was generated: "json", "path", "Predict", "png-rest-batch"...
    transport: str  # http (a request on the REST port) | grpc | tcp (raw bytes, REST port) | tcp-grpc
    data: bytes  # the HTTP request bytes, the serialized gRPC request, or the raw bytes
    method: str = ""  # gRPC method path
    answer_due: bool = True  # http: the request is framed completely, so an answer is due
    keepalive_check: bool = False  # http: a valid request follows on the connection; it must get a 200
    images: int | None = None  # a Predict of this many images: an OK answer holds as many digits
    controls: list[int] | None = None  # control digits sent (in order): the answer must be theirs
    note: str = ""  # how the input was made

    def reproducer(self) -> dict:
        found = {"family": self.family, "kind": self.kind, "transport": self.transport, "note": self.note,
                 "bytes": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()[:16],
                 "head": repr(self.data[:300])}
        if self.method:
            found["method"] = self.method
        if len(self.data) <= KEEP_INPUT_BYTES:
            found["base64"] = base64.b64encode(self.data).decode()
        return found


@dataclass
class Outcome:
    label: str  # "HTTP 400", "grpc INVALID_ARGUMENT", "closed without answer"...
    failure: str | None = None  # why this is a failure, or None
    seconds: float = 0.0
    detail: str = ""


def grpc_failure(code: str) -> str | None:
    return None if code in FINE_GRPC_CODES else f"gRPC {code}"


def http_failure(status: int) -> str | None:
    return f"HTTP {status}" if status >= 500 and status not in FINE_HTTP_5XX else None


# ------------------------------------------------------------------------------------------------ image material

def _save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def encodings(digit: np.ndarray) -> list[tuple[str, bytes]]:
    """One 28x28 uint8 digit (white on black, as in MNIST) in the formats and modes a client might send."""
    grey = Image.fromarray(digit)
    paper = ImageOps.invert(grey)  # black on white, like a scan
    large = paper.resize((112, 112))
    rgba = Image.merge("RGBA", (grey, grey, grey, grey))  # ink opaque, background transparent
    frames = [paper, paper.rotate(10, fillcolor=255), paper.rotate(-10, fillcolor=255)]
    return [
        ("png", _save(grey, "PNG")), ("png-paper", _save(paper, "PNG")),
        ("png-rgb", _save(large.convert("RGB"), "PNG")),
        ("png-rgba", _save(rgba, "PNG")), ("png-palette", _save(paper.convert("P"), "PNG")),
        ("png-16bit", _save(Image.fromarray(digit.astype(np.uint16) * 257), "PNG")),
        ("png-1bit", _save(paper.convert("1"), "PNG")), ("png-la", _save(paper.convert("LA"), "PNG")),
        ("jpeg", _save(paper, "JPEG", quality=90)), ("jpeg-progressive", _save(large, "JPEG", progressive=True)),
        ("jpeg-cmyk", _save(large.convert("CMYK"), "JPEG")),
        ("gif", _save(paper, "GIF")), ("gif-animated", _save(frames[0], "GIF", save_all=True,
                                                             append_images=frames[1:], duration=50)),
        ("bmp", _save(paper.convert("RGB"), "BMP")), ("bmp-8bit", _save(paper, "BMP")),
        ("bmp-1bit", _save(paper.convert("1"), "BMP")), ("bmp-rgba", _save(rgba, "BMP")),
        ("webp", _save(large, "WEBP", quality=80)), ("webp-lossless", _save(paper, "WEBP", lossless=True)),
        ("tiff", _save(paper, "TIFF")), ("ico", _save(large, "ICO")), ("ppm", _save(paper, "PPM")),
        ("tga", _save(paper, "TGA")),
    ]


def large_images(digit: np.ndarray) -> list[tuple[str, bytes]]:
    """Files within the documented limits (4096 px a side) that decode to many pixels, and one just over."""
    sheet = Image.new("L", (4096, 4096), 255)
    sheet.paste(ImageOps.invert(Image.fromarray(digit)).resize((2048, 2048)), (1024, 1024))
    over = Image.new("L", (4097, 64), 255)
    return [("png-4096", _save(sheet, "PNG", optimize=True)), ("jpeg-4096", _save(sheet, "JPEG", quality=20)),
            ("gif-4096", _save(sheet.convert("P"), "GIF")), ("png-4097", _save(over, "PNG"))]


@dataclass
class Material:
    """Valid inputs the cases start from: control PNGs (plain MNIST digits), other encodings, large images."""

    controls: list[bytes]
    pool: list[tuple[str, bytes]]
    large: list[tuple[str, bytes]]
    pixels: list[np.ndarray]  # the control digits as float32 [28, 28, 1] in [0, 1], for predict_pixels

    @classmethod
    def from_digits(cls, digits: np.ndarray, large: bool = True) -> Material:
        digits = np.asarray(digits, np.uint8).reshape(-1, 28, 28)
        pool = [item for digit in digits[:8] for item in encodings(digit)]
        return cls(controls=[_save(Image.fromarray(d), "PNG") for d in digits], pool=pool,
                   large=large_images(digits[0]) if large else [],
                   pixels=[(d.astype(np.float32) / 255.0)[..., None] for d in digits])

    @classmethod
    def load(cls, data_dir: str, count: int = 20, large: bool = True) -> Material:
        from training import data
        from training.config import Config

        split = data.load_split(Config(data_dir=data_dir, test_subset=count), "test")
        images = [x.numpy() for x, _ in split]
        return cls.from_digits(np.stack(images), large)


# ----------------------------------------------------------------------------------------------- image mutation

INTERESTING_16 = [0, 1, 2, 27, 28, 29, 255, 256, 4095, 4096, 4097, 8192, 16384, 32767, 32768, 65535]
INTERESTING_32 = [*INTERESTING_16, 65536, 100_000, 16_777_216, 2**31 - 1, 2**31, 2**32 - 1]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
          b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"\xff\x0a", b"II*\x00",
          b"\x00\x00\x01\x00"]


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _position(rng: random.Random, data: bytes) -> int:
    """Header bytes half the time: they are what a decoder reads first."""
    if not data:
        return 0
    return rng.randrange(min(len(data), 64)) if rng.random() < 0.5 else rng.randrange(len(data))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_chunk(kind: bytes, body: bytes, length: int | None = None, crc: bool = True) -> bytes:
    check = zlib.crc32(kind + body) if crc else 0
    return struct.pack(">I", len(body) if length is None else length) + kind + body + struct.pack(">I", check)


def _mutate_png(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    chunks = _png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return data, "png: not parsed"
    op = rng.choice(["ihdr-size", "ihdr-byte", "duplicate", "drop", "huge-length", "many-chunks", "reorder"])
    ihdr = bytearray(chunks[0][1])
    if op == "ihdr-size":
        offset = rng.choice([0, 4])
        ihdr[offset:offset + 4] = struct.pack(">I", rng.choice(INTERESTING_32))
        chunks[0] = (b"IHDR", bytes(ihdr))
    elif op == "ihdr-byte":  # bit depth, colour type, compression, filter, interlace
        ihdr[rng.randrange(8, 13)] = rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 16, 255])
        chunks[0] = (b"IHDR", bytes(ihdr))
    elif op == "duplicate":
        i = rng.randrange(len(chunks))
        chunks.insert(i, chunks[i])
    elif op == "drop" and len(chunks) > 1:
        chunks.pop(rng.randrange(1, len(chunks)))
    elif op == "reorder":
        rng.shuffle(chunks)
    crc = rng.random() < 0.8
    body = b"".join(_png_chunk(kind, chunk, crc=crc) for kind, chunk in chunks)
    if op == "huge-length":  # a chunk that declares more than the file holds
        extra = _png_chunk(rng.choice([b"tEXt", b"IDAT", b"zTXt", b"iCCP", b"aBcD"]), b"x" * rng.randrange(16),
                           length=rng.choice(INTERESTING_32[6:]))
        body = _png_chunk(b"IHDR", bytes(ihdr)) + extra + body[25:]
    elif op == "many-chunks":  # thousands of small chunks before the image data
        n = rng.choice([100, 1000, 8192, 8193, 20000])
        small = _png_chunk(b"tEXt", b"k\x00v")
        body = _png_chunk(b"IHDR", bytes(ihdr)) + small * n + body[25:]
    return data[:8] + body, f"png {op}{'' if crc else ' (CRC left wrong)'}"


def _set(data: bytearray, offset: int, packed: bytes) -> None:
    if offset + len(packed) <= len(data):
        data[offset:offset + len(packed)] = packed


def _mutate_header(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Changes a size field where each format keeps it."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        return _mutate_png(rng, data)
    if data.startswith(b"\xff\xd8"):  # the SOFn segment: height, width (big-endian 16 bits)
        for i in range(2, len(data) - 9):
            if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xCF and data[i + 1] not in (0xC4, 0xC8, 0xCC):
                _set(out, i + rng.choice([5, 7]), struct.pack(">H", rng.choice(INTERESTING_16)))
                if rng.random() < 0.3:
                    out[i + 9] = rng.choice([0, 1, 3, 4, 5, 255])  # components
                return bytes(out), "jpeg SOF size"
        return data, "jpeg: no SOF"
    if data.startswith(b"GIF8"):
        where = rng.choice(["screen", "frame"])
        if where == "screen":
            _set(out, rng.choice([6, 8]), struct.pack("<H", rng.choice(INTERESTING_16)))
        else:
            i = data.find(b"\x2c", 13)
            if i > 0:
                _set(out, i + rng.choice([1, 3, 5, 7]), struct.pack("<H", rng.choice(INTERESTING_16)))
        return bytes(out), f"gif {where} size"
    if data.startswith(b"BM"):
        offset = rng.choice([2, 10, 14, 18, 22, 28, 30, 34, 46])
        value = rng.choice(INTERESTING_32)
        if offset in (18, 22) and rng.random() < 0.4:
            value = -value & 0xFFFFFFFF  # negative: top-down rows
        _set(out, offset, struct.pack("<H" if offset == 28 else "<I", value & (0xFFFF if offset == 28 else 0xFFFFFFFF)))
        return bytes(out), f"bmp field at {offset}"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        kind = data[12:16]
        if kind == b"VP8 ":
            _set(out, rng.choice([26, 28]), struct.pack("<H", rng.choice(INTERESTING_16) & 0x3FFF))
        elif kind == b"VP8L":
            _set(out, 21, struct.pack("<I", rng.getrandbits(32)))
        elif kind == b"VP8X":
            _set(out, rng.choice([24, 27]), struct.pack("<I", rng.choice(INTERESTING_32))[:3])
        if rng.random() < 0.3:
            _set(out, 4, struct.pack("<I", rng.choice(INTERESTING_32)))  # the RIFF size
        return bytes(out), f"webp {kind.decode(errors='replace').strip()} size"
    return _flip_bits(rng, data)


def _flip_bits(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    out = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 16, 64])
    for _ in range(n if out else 0):
        out[_position(rng, out)] ^= 1 << rng.randrange(8)
    return bytes(out), f"{n} bit(s) flipped"


def mutate_image(rng: random.Random, material: Material) -> tuple[bytes, str]:
    """One mutated image: a pool image through one to three mutations, or made-up bytes."""
    name, data = rng.choice(material.pool)
    if rng.random() < 0.4:  # PNG is what clients send: weight it
        name, data = rng.choice([item for item in material.pool if item[0].startswith("png")])
    notes = [name]
    if rng.random() < 0.06:
        magic = rng.choice([b"", *MAGICS])
        return magic + _random_bytes(rng, rng.choice([0, 1, 16, 100, 1000, 5000])), f"garbage after {magic[:8]!r}"
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.choice(["flip", "flip", "header", "header", "interesting", "truncate", "append", "insert", "delete",
                         "splice", "repeat"])
        out = bytearray(data)
        if op == "flip":
            data, note = _flip_bits(rng, data)
        elif op == "header":
            data, note = _mutate_header(rng, data)
        elif op == "interesting":
            pos = _position(rng, out)
            size = rng.choice([1, 2, 4])
            value = rng.choice(INTERESTING_32) & ((1 << 8 * size) - 1)
            _set(out, pos, value.to_bytes(size, rng.choice(["big", "little"])))
            data, note = bytes(out), f"{size} byte(s) at {pos} set to {value}"
        elif op == "truncate":
            cut = rng.randrange(len(data) + 1) if rng.random() < 0.7 else rng.randrange(min(len(data), 40) + 1)
            data, note = data[:cut], f"truncated to {cut}"
        elif op == "append":
            data, note = data + (_random_bytes(rng, rng.randrange(1, 512)) if rng.random() < 0.5 else data), "appended"
        elif op == "insert":
            pos = _position(rng, out)
            data, note = data[:pos] + _random_bytes(rng, rng.randrange(1, 64)) + data[pos:], f"bytes inserted at {pos}"
        elif op == "delete":
            pos = _position(rng, out)
            data, note = data[:pos] + data[pos + rng.randrange(1, 64):], f"bytes deleted at {pos}"
        elif op == "splice":
            other_name, other = rng.choice(material.pool)
            i, j = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
            data, note = data[:i] + other[j:], f"spliced with {other_name}"
        else:
            pos, length = _position(rng, out), rng.randrange(1, 64)
            data, note = data[:pos] + data[pos:pos + length] * rng.randrange(2, 50) + data[pos:], "a range repeated"
        notes.append(note)
    return data, ", ".join(notes)


# ------------------------------------------------------------------------------------------------------ HTTP bits

def http_request(method: str | bytes, path: str | bytes, body: bytes = b"", headers: list[tuple] | None = None,
                 version: str | bytes = "HTTP/1.1", content_length: bool = True) -> bytes:
    def raw(value) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")

    lines = [raw(method) + b" " + raw(path) + b" " + raw(version)]
    given_headers = list(headers if headers is not None else [("Host", "127.0.0.1"),
                                                              ("Content-Type", "application/json")])
    if content_length and (body or raw(method) == b"POST"):
        given_headers.append(("Content-Length", str(len(body))))
    lines += [raw(name) + b": " + raw(value) for name, value in given_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Stream(io.BytesIO):
    """Bytes already received, which http.client.HTTPResponse may not close: more answers may follow."""

    def close(self) -> None:
        pass


class _Buffer:
    """The socket http.client.HTTPResponse reads a response from."""

    def __init__(self, stream: io.BytesIO) -> None:
        self.stream = stream

    def makefile(self, *args, **kwargs) -> io.BytesIO:
        return self.stream


@dataclass
class HttpAnswer:
    status: int
    will_close: bool
    content_type: str
    body: bytes


def parse_answers(raw: bytes, head: bool = False) -> tuple[list[HttpAnswer], str]:
    """The HTTP answers in bytes received on one connection, and what could not be read after them."""
    stream, answers = _Stream(raw), []
    while stream.tell() < len(raw):
        response = http.client.HTTPResponse(_Buffer(stream), method="HEAD" if head and not answers else "GET")
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, ValueError, OSError) as e:
            return answers, f"{type(e).__name__}: {e}"[:200]
        answers.append(HttpAnswer(response.status, bool(response.will_close),
                                  response.getheader("Content-Type", ""), body))
        if head or response.will_close:
            break
    return answers, ""


def exchange(port: int, data: bytes, timeout: float, then: bytes = b"") -> tuple[bytes, str]:
    """Sends the bytes (and `then` after them on the same connection), half-closes, reads until the server
    closes. Returns what came back and "", "reset", "timeout" or "refused"."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return b"", f"refused ({e})"
    chunks, total, error = [], 0, ""
    deadline = time.monotonic() + timeout
    with sock:
        try:
            sock.sendall(data + then)
        except OSError:  # the server answered and closed before reading all of it (413, garbage): read its answer
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                error = "timeout"
                break
            except OSError:
                error = "reset"
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > 8 * 2**20:
                break
    return b"".join(chunks), error


# ------------------------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    """A running server: its ports, how to read its memory and whether it is alive."""

    rest_port: int
    grpc_port: int
    pid: int
    alive: Callable[[], bool] = lambda: True
    log_findings: Callable[[], dict] = lambda: {"tracebacks": 0, "lines": []}
    probe: Callable[[], dict] | None = None  # the server's own accounts of its memory (--probe-every)
    follow_up: bytes = b""  # the valid request sent after a kept-alive one
    channel: grpc.Channel | None = None

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}",
                                             options=[("grpc.max_receive_message_length", 64 * 2**20)])
        self._calls: dict[str, Callable] = {}

    def call(self, method: str) -> Callable:
        if method not in self._calls:
            self._calls[method] = self.channel.unary_unary(method)  # bytes in, bytes out
        return self._calls[method]

    def status(self, key: str) -> float:
        """A /proc/PID/status figure (VmRSS, VmHWM) in MB; NaN once the process is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM back to the current VmRSS
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.channel.close()


def valid_rest_request(png: bytes) -> bytes:
    body = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    return http_request("POST", f"/v1/models/{MODEL_NAME}:predict", body)


def valid_predict(pngs: list[bytes]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    tensor = request.inputs["image_bytes"]
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=len(pngs))
    tensor.string_val.extend(pngs)
    return request


def _digits_from_grpc(data: bytes) -> tuple[list[int] | None, list[list[float]] | None]:
    """The digits and probabilities of a PredictResponse; None for an output it does not hold (filtered)."""
    response = predict_pb2.PredictResponse.FromString(data)
    from tensorflow import make_ndarray

    if "digit" not in response.outputs:
        return None, None
    digits = make_ndarray(response.outputs["digit"]).ravel().tolist()
    probabilities = make_ndarray(response.outputs["probabilities"]).tolist() if "probabilities" in response.outputs \
        else None
    return digits, probabilities


def _digits_from_json(body: bytes) -> tuple[list[int], list[list[float]] | None]:
    answer = json.loads(body)
    if "results" in answer:  # :classify, [[label, score] x 10] per example
        scores = [[score for _, score in row] for row in answer["results"]]
        return [int(max(row, key=lambda pair: pair[1])[0]) for row in answer["results"]], scores
    if "predictions" in answer:
        rows = answer["predictions"]
        if rows and isinstance(rows[0], dict):
            return [row["digit"] for row in rows], [row.get("probabilities") for row in rows]
        return rows, None
    outputs = answer["outputs"]
    if isinstance(outputs, dict):
        return outputs["digit"], outputs.get("probabilities")
    return outputs, None


def check_answer(case: Case, digits: list, reference: list[list[float]] | None) -> str | None:
    """Why an OK Predict answer is wrong, or None."""
    if case.images is not None and len(digits) != case.images:
        return f"{len(digits)} digits answered for {case.images} images"
    if not all(isinstance(d, int) and 0 <= d <= 9 for d in digits):
        return f"digits out of 0-9: {digits[:8]}"
    if case.controls and reference:
        for i, digit in zip(case.controls, digits):
            probabilities = reference[i]
            if probabilities and probabilities[digit] < max(probabilities) - 1e-3:  # near ties may go either way
                return f"control digit {i} answered {digit}, {int(np.argmax(probabilities))} at the start"
    return None


# -------------------------------------------------------------------------------------------------- sending cases

def send(case: Case, target: Target, timeout: float, reference: list[list[float]] | None) -> Outcome:
    started = time.monotonic()
    if case.transport == "grpc":
        outcome = _send_grpc(case, target, timeout, reference)
    elif case.transport in ("http", "tcp"):
        outcome = _send_http(case, target, timeout, reference)
    else:  # raw bytes on the gRPC port: the HTTP/2 layer must close or answer, nothing more
        _, error = exchange(target.grpc_port, case.data, timeout)
        outcome = Outcome("grpc port: " + ("timeout" if error == "timeout" else "closed"),
                          "no end to the connection (timeout)" if error == "timeout" else None)
    outcome.seconds = time.monotonic() - started
    return outcome


def _send_grpc(case: Case, target: Target, timeout: float, reference) -> Outcome:
    try:
        response = target.call(case.method)(case.data, timeout=timeout)
    except grpc.RpcError as e:
        code = e.code().name if e.code() else "UNKNOWN"
        return Outcome(f"grpc {code}", grpc_failure(code), detail=(e.details() or "")[:300])
    if case.method.endswith("/Predict"):
        try:
            digits, _ = _digits_from_grpc(response)
        except Exception as e:
            return Outcome("grpc OK", f"malformed Predict answer: {type(e).__name__}: {e}"[:300])
        if digits is None:  # an output_filter without "digit" (only then: case.images is None for those)
            return Outcome("grpc OK", None if case.images is None else "a Predict answer without digits")
        problem = check_answer(case, digits, reference)
        if problem:
            return Outcome("grpc OK", f"wrong Predict answer: {problem}")
    return Outcome("grpc OK")


def _send_http(case: Case, target: Target, timeout: float, reference) -> Outcome:
    follow = target.follow_up if case.keepalive_check else b""
    head = case.data[:5] == b"HEAD "
    raw, error = exchange(target.rest_port, case.data, timeout, follow)
    answers, unreadable = parse_answers(raw, head)
    if not answers:
        if error == "timeout":
            return Outcome("no answer (timeout)", "no answer and the connection left open (timeout)")
        if unreadable and raw:
            return Outcome("unreadable answer", f"an answer that is not HTTP: {unreadable}", detail=repr(raw[:200]))
        label = "closed without answer" if not error else f"no answer ({error})"
        return Outcome(label, f"no answer ({error or 'closed'})" if case.answer_due else None)
    first = answers[0]
    outcome = Outcome(f"HTTP {first.status}", http_failure(first.status),
                      detail=first.body[:300].decode("utf-8", "replace"))
    if outcome.failure:
        return outcome
    if 200 <= first.status < 300 and "json" in first.content_type:
        try:
            json.loads(first.body)
        except ValueError as e:
            return Outcome(outcome.label, f"200 with a body that is not JSON: {e}", detail=repr(first.body[:200]))
        if case.images is not None or b":predict" in case.data.split(b"\r\n", 1)[0]:
            try:
                digits, _ = _digits_from_json(first.body)
            except (KeyError, TypeError, IndexError, ValueError) as e:
                return Outcome(outcome.label, f"malformed Predict answer: {type(e).__name__}: {e}"[:300])
            if case.images is not None:
                problem = check_answer(case, digits, reference)
                if problem:
                    return Outcome(outcome.label, f"wrong Predict answer: {problem}")
    if case.keepalive_check and not first.will_close:
        if len(answers) < 2:
            return Outcome(outcome.label + ", then nothing",
                           "the connection stayed open, but the valid request sent next on it got no answer "
                           f"({unreadable or error or 'closed'})")
        if answers[1].status != 200:
            return Outcome(outcome.label + f", then {answers[1].status}",
                           f"the connection stayed open, but the valid request sent next on it got "
                           f"HTTP {answers[1].status}: {answers[1].body[:120]!r}")
    return outcome



# ------------------------------------------------------------------------------------------------ generators

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HUGE = "\x00HUGE{}\x00"  # a placeholder: Python will not print integers of more than 4,300 digits
JSON_HUGE_DIGITS = [19, 20, 39, 309, 4299, 4300, 4301, 5000, 20000]
B64_TEXTS = ["", "=", "====", "QUJD", "QUJ", "QUJDRA==", "QUJDRA", "QUJDRA===", "!!!!", "QU JD", "QUJD\n", "éééé",
             "Q\x00JD", "iVBORw0KGgo=", "_-_-", "////", "++++"]


def json_scalars():
    texts = (st.text(max_size=40)
             | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
             | st.sampled_from(["", "serving_default", "predict_pixels", "image_bytes", "pixels", "b64", "\x00",
                                "\ufeff", "🙂", "a" * 5000]))
    huge = st.sampled_from([2**31, 2**63, -(2**63) - 1, 2**64, 10**40]) | st.sampled_from(
        [HUGE.format(k) for k in JSON_HUGE_DIGITS])
    b64 = st.builds(lambda s: {"b64": s}, st.sampled_from(B64_TEXTS) | st.binary(max_size=48).map(_b64)
                    | st.integers() | st.none() | st.lists(st.integers(), max_size=3))
    return (st.none() | st.booleans() | st.integers() | huge | st.floats(allow_nan=True, allow_infinity=True)
            | texts | b64)


JSON_VALUES = st.recursive(json_scalars(), lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=12) | st.sampled_from(
                               ["instances", "inputs", "b64", "image_bytes", "pixels", "signature_name"]),
                               children, max_size=4), max_leaves=20)


def json_template(draw, rng: random.Random, material: Material) -> tuple[object, int | None, str]:
    """A valid :predict body, the number of images it holds, and its name."""
    n = draw(st.sampled_from([1, 1, 1, 2, 3, 8]))
    picks = [rng.randrange(len(material.controls)) for _ in range(n)]
    images = [_b64(material.controls[i]) for i in picks]
    pixels = [material.pixels[i].tolist() for i in picks]
    name = draw(st.sampled_from(["instances-b64", "instances-named", "inputs-named", "inputs-bare", "signature",
                                 "pixels-instances", "pixels-inputs"]))
    body = {"instances-b64": {"instances": [{"b64": b} for b in images]},
            "instances-named": {"instances": [{"image_bytes": {"b64": b}} for b in images]},
            "inputs-named": {"inputs": {"image_bytes": [{"b64": b} for b in images]}},
            "inputs-bare": {"inputs": [{"b64": b} for b in images]},
            "signature": {"signature_name": "serving_default", "instances": [{"b64": b} for b in images]},
            "pixels-instances": {"signature_name": "predict_pixels", "instances": pixels},
            "pixels-inputs": {"signature_name": "predict_pixels", "inputs": {"pixels": pixels}}}[name]
    return body, n, name


def classify_template(draw, rng: random.Random, material: Material) -> tuple[object, int, str]:
    """A valid :classify body, the number of images it holds, and its name."""
    n = draw(st.sampled_from([1, 1, 2, 3, 8]))
    images = [_b64(material.controls[rng.randrange(len(material.controls))]) for _ in range(n)]
    name = draw(st.sampled_from(["classify", "classify-context"]))
    if name == "classify":
        return {"signature_name": "classification", "examples": [{FEATURE: {"b64": b}} for b in images]}, n, name
    return {"signature_name": "classification", "context": {FEATURE: {"b64": images[0]}},
            "examples": [{}] + [{FEATURE: {"b64": b}} for b in images[1:]]}, n, name


def _nodes(value, path=()) -> list[tuple]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:6]):
            found += _nodes(item, (*path, i))
    return found


def _get(value, path):
    for step in path:
        value = value[step]
    return value


def _replace(root, path, new):
    if not path:
        return new
    _get(root, path[:-1])[path[-1]] = new
    return root


def mutate_json(draw, rng: random.Random, body, material: Material) -> tuple[object, str]:
    op = draw(st.sampled_from(["replace", "replace", "delete", "add", "rename", "wrap", "repeat", "image",
                               "b64", "shape", "type"]))
    path = rng.choice(_nodes(body))
    node = _get(body, path)
    if op == "replace":
        return _replace(body, path, draw(JSON_VALUES)), f"{list(path)} replaced"
    if op == "delete" and path:
        parent = _get(body, path[:-1])
        del parent[path[-1]]
        return body, f"{list(path)} deleted"
    if op == "add" and isinstance(node, dict):
        key = draw(st.sampled_from(["inputs", "instances", "signature_name", "b64", "image_bytes", "pixels", "extra"])
                   | st.text(max_size=10))
        node[key] = draw(JSON_VALUES)
        return body, f"key {key!r} added at {list(path)}"
    if op == "rename" and isinstance(node, dict) and node:
        key = rng.choice(list(node))
        node[draw(st.text(max_size=10))] = node.pop(key)
        return body, f"key {key!r} renamed at {list(path)}"
    if op == "wrap":
        return _replace(body, path, [node] * draw(st.sampled_from([1, 1, 2]))), f"{list(path)} wrapped in a list"
    if op == "repeat" and isinstance(node, list) and node:
        times = draw(st.sampled_from([2, 10, 100, 1000]))
        times = max(2, min(times, 2**20 // max(1, len(json.dumps(node)))))  # about 1 MB at most
        return _replace(body, path, (node * times)[:max(len(node), times)]), f"{list(path)} repeated to {times}"
    if op == "image":
        data, note = mutate_image(rng, material)
        return _replace(body, path, {"b64": _b64(data)}), f"{list(path)} = mutated image ({note})"
    if op == "b64":
        return _replace(body, path, {"b64": draw(st.sampled_from(B64_TEXTS))}), f"{list(path)} = bad base64"
    if op == "shape":  # pixels or lists of the wrong size
        size, value = draw(st.sampled_from([0, 1, 27, 29, 784])), draw(JSON_VALUES)
        size = min(size, 2**20 // max(1, len(json.dumps(value))))  # about 1 MB at most
        return _replace(body, path, [value] * size), f"{list(path)} = list of {size}"
    value = {"b64": node} if isinstance(node, str) else str(node)[:100]
    return _replace(body, path, value), f"{list(path)} type changed"


def serialize_json(draw, rng: random.Random, body) -> tuple[bytes, str]:
    how = draw(st.sampled_from(["plain", "plain", "plain", "ascii", "pretty", "raw-surrogates", "truncated",
                                "trailing", "bom", "utf-16", "flipped", "latin-1"]))
    text = json.dumps(body, ensure_ascii=how == "ascii", indent=2 if how == "pretty" else None)
    room = 4 * 2**20 - len(text)  # the integers written out may add this many characters at most
    for k in sorted(JSON_HUGE_DIGITS):
        placeholder = json.dumps(HUGE.format(k))
        found = text.count(placeholder)
        digits = k if found * k <= room else 19
        room -= found * digits
        text = text.replace(placeholder, "9" * digits)
    if how == "utf-16":
        return text.encode("utf-16", "surrogatepass"), how
    if how == "latin-1":
        return text.encode("latin-1", "replace"), how
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates become bytes that are not UTF-8
    if how == "truncated":
        data = data[:rng.randrange(len(data) + 1)]
    elif how == "trailing":
        data += rng.choice([b",", b"}", b"]", b" x", b"\x00", b"{}", _random_bytes(rng, 8)])
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    elif how == "flipped":
        data = _flip_bits(rng, data)[0]
    return data, how


def deep_json(draw) -> tuple[bytes, str]:
    depth = draw(st.sampled_from([100, 999, 1000, 3000, 10000, 100000, 500000]))
    shape = draw(st.sampled_from(["lists", "objects", "b64"]))
    if shape == "lists":
        inner = "[" * depth + "]" * depth
    elif shape == "objects":
        inner = '{"a":' * depth + "1" + "}" * depth
    else:
        inner = '{"b64":' * depth + '"QUJD"' + "}" * depth
    return ('{"instances": [' + inner + "]}").encode(), f"{shape} nested {depth} deep"


VERSION_TEXTS = ["1", "0", "01", "-1", "+1", "2", "1.0", "1e3", " 1", "١", "１", "²", "18446744073709551616",
                 "9223372036854775807", "9223372036854775808", "", "%31", "0x1", "1_000"]


def api_path(draw, rng: random.Random) -> str:
    name = draw(st.sampled_from([MODEL_NAME] * 6 + ["", "MNIST", "mnist ", "mnist%00", "..", "%2e%2e", "default",
                                                   "m" * 3000]) | st.text(min_size=1, max_size=20))
    choice = draw(st.sampled_from(["", "", "version", "label"]))
    middle = ""
    if choice == "version":
        version = draw(st.sampled_from(VERSION_TEXTS) | st.integers(0, 2**70).map(str)
                       | st.sampled_from([4299, 4300, 4301, 5000, 20000]).map(lambda k: "1" * k))
        middle = f"/versions/{version}"
    elif choice == "label":
        middle = "/labels/" + draw(st.sampled_from(["stable", "canary", "1", ""]) | st.text(max_size=30))
    tail = draw(st.sampled_from(["", "/metadata", ":predict", ":predict", ":classify", ":regress", ":predict/",
                                 "/metadata/", ":PREDICT", ":explain", "/", "//", ":predict:predict", "/:predict",
                                 "?x=1", ":predict?signature_name=x", "#frag"]))
    path = f"/v1/models/{name}{middle}{tail}"
    if rng.random() < 0.1:
        path = rng.choice(["/", "/index.html", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/v1/models",
                           "/v1/models/", "/v1/", "/v2/models/mnist", "*", "http://127.0.0.1/v1/models/mnist",
                           METRICS_PATH, METRICS_PATH + "/", "/static/../serving/server.py", "//v1/models/mnist",
                           "/v1/models/mnist/versions", "/v1/models/mnist/labels", "/web/index.html"])
    if rng.random() < 0.7:  # mostly a request line the server can read: percent-encode what is not URL-safe
        path = quote(path, safe="/:%?=&#*")
    return path


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "post", "PRI",
           "FOO", "G\x00ET", "GET\t", "POSTX", "M-SEARCH", "\u00e9"]


def rest_case(data, rng: random.Random, material: Material) -> Case:
    draw = data.draw
    kind = draw(st.sampled_from(["json"] * 8 + ["path"] * 3 + ["method"] * 2 + ["headers"] * 3 + ["bytes"] * 2
                                + ["raw"] * 2 + ["deep"]))
    predict = f"/v1/models/{MODEL_NAME}:predict"
    if kind == "json":
        body, images, name = json_template(draw, rng, material)
        if draw(st.integers(0, 3)) == 0:  # a quarter of the bodies go to :classify
            body, images, name = classify_template(draw, rng, material)
            predict = f"/v1/models/{MODEL_NAME}:classify"
        notes = [name]
        mutations = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
        for _ in range(mutations):
            body, note = mutate_json(draw, rng, body, material)
            notes.append(note)
        payload, how = serialize_json(draw, rng, body)
        notes.append(how)
        if len(payload) > 4 * 2**20:  # repeated lists of long values: keep the request small
            payload, how = payload[:2**20], "cut to 1 MB"
            notes.append(how)
        valid = mutations == 0 and how in ("plain", "ascii", "pretty", "bom", "utf-16")
        return Case("rest", "json", "http", http_request("POST", predict, payload), keepalive_check=True,
                    images=images if valid else None, note="; ".join(notes)[:400])
    if kind == "deep":
        payload, note = deep_json(draw)
        return Case("rest", "deep", "http", http_request("POST", predict, payload), keepalive_check=True, note=note)
    if kind == "bytes":
        size = draw(st.sampled_from([0, 1, 2, 16, 256, 4096, 65536, 300_000]))
        payload = _random_bytes(rng, size)
        content_type = draw(st.sampled_from(["application/json", "application/octet-stream", "image/png", "",
                                             "text/plain; charset=utf-16"]))
        request = http_request("POST", predict, payload, [("Host", "x"), ("Content-Type", content_type)])
        return Case("rest", "bytes", "http", request, keepalive_check=True, note=f"{size} random bytes")
    if kind in ("path", "method"):
        method = draw(st.sampled_from(["GET", "POST"])) if kind == "path" else draw(
            st.sampled_from(METHODS) | st.text(min_size=1, max_size=8).filter(lambda s: " " not in s))
        path = api_path(draw, rng)
        body = b""
        if method == "POST" or draw(st.booleans()):
            body = json.dumps(json_template(draw, rng, material)[0]).encode() if draw(st.booleans()) else \
                _random_bytes(rng, rng.randrange(0, 200))
        request = http_request(method, path, body)
        framed = " " not in path and "\r" not in path and "\n" not in path and method.isascii() and \
            method.strip() == method and method.isprintable() and method != "HEAD"
        return Case("rest", kind, "http", request, answer_due=framed, keepalive_check=framed,
                    note=f"{method} {path[:200]} with {len(body)} body bytes")
    if kind == "headers":
        return _headers_case(draw, rng, material)
    return _raw_case(draw, rng, material)


def _headers_case(draw, rng: random.Random, material: Material) -> Case:
    body = json.dumps(json_template(draw, rng, material)[0]).encode()
    predict = f"/v1/models/{MODEL_NAME}:predict"
    headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
    change = draw(st.sampled_from(["length", "length", "short", "long", "no-length", "two-lengths", "chunked",
                                   "expect", "content-type", "big-header", "many-headers", "no-colon", "fold",
                                   "connection", "version", "latin-1", "no-host", "get-with-body"]))
    version, answer_due, keepalive, method, manual_length = "HTTP/1.1", True, True, "POST", True
    if change == "length":
        value = draw(st.sampled_from(["-1", "+5", " 5", "5 ", "0x10", "1e3", "abc", "", "5,5", "٣",
                                      str(MAX_BODY_BYTES + 1), "99999999999999999999999", str(2**64)]))
        headers.append(("Content-Length", value))
        keepalive, note = False, f"Content-Length: {value!r}"
    elif change == "short":
        headers.append(("Content-Length", str(rng.randrange(len(body)))))
        keepalive, note = False, "Content-Length shorter than the body"
    elif change == "long":
        headers.append(("Content-Length", str(len(body) + rng.randrange(1, 100))))
        keepalive, answer_due, note = False, False, "Content-Length longer than the body (then end of file)"
    elif change == "no-length":
        keepalive, note = False, "no Content-Length"
    elif change == "two-lengths":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + rng.choice([0, 1, -1])))]
        keepalive, note = False, "two Content-Length headers"
    elif change == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "chunked, identity", "gzip", "x"]))))
        if draw(st.booleans()):
            headers.append(("Content-Length", str(len(body))))
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        keepalive, note = False, "Transfer-Encoding"
    elif change == "expect":
        manual_length = False
        headers.append(("Expect", draw(st.sampled_from(["100-continue", "100-Continue", "200-ok", "x" * 300]))))
        note = "Expect"
    elif change == "content-type":
        headers[1] = ("Content-Type", draw(st.sampled_from(["text/plain", "application/json; charset=utf-16", "",
                                                            "image/png", "multipart/form-data; boundary=x"])
                                           | st.text(max_size=40).filter(lambda s: "\r" not in s and "\n" not in s)))
        note = f"Content-Type {headers[1][1]!r}"
        manual_length = False
    elif change == "big-header":
        size = draw(st.sampled_from([8000, 65535, 65537, 200_000]))
        headers.append(("X-Big", "x" * size))
        keepalive, answer_due, note = False, size < 65000, f"a header of {size} bytes"
        manual_length = False
    elif change == "many-headers":
        count = draw(st.sampled_from([99, 101, 1000]))
        headers += [(f"X-H{i}", "v") for i in range(count)]
        keepalive, note = False, f"{count} more headers"
        manual_length = False
    elif change == "no-colon":
        headers.append(("X-No-Colon\x00", "v"))
        headers.append((draw(st.sampled_from(["NoColonAtAll", " Leading-Space", "Bad Name", ":", "X-\u00e9"])), "v"))
        keepalive, note = False, "malformed header lines"
        manual_length = False
    elif change == "fold":
        headers.append(("X-Folded", "a\r\n continued"))
        keepalive, note = False, "obs-fold header"
        manual_length = False
    elif change == "connection":
        value = draw(st.sampled_from(["close", "keep-alive", "Upgrade", "upgrade, close", "x"]))
        headers.append(("Connection", value))
        if value == "Upgrade":
            headers.append(("Upgrade", "h2c"))
        note = f"Connection: {value}"
        manual_length = False
    elif change == "version":
        version = draw(st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9", "http/1.1", "HTTP/1.1.1",
                                        "HTTP/01.1", "HTTP/1", "HTTP/", "HTTP/1.1x", "HTTP/-1.1"]))
        keepalive, note = False, f"version {version}"
        manual_length = False
    elif change == "latin-1":
        headers.append(("X-Latin", b"\xe9\xff\x80"))
        note = "non-ASCII header value"
        manual_length = False
    elif change == "no-host":
        headers = [("Content-Type", "application/json")]
        note = "no Host"
        manual_length = False
    else:  # a body the server may not read: it must read it or close the connection
        method = "GET"
        predict = draw(st.sampled_from([f"/v1/models/{MODEL_NAME}", f"/v1/models/{MODEL_NAME}/metadata", "/",
                                        METRICS_PATH]))
        body = b"GET /v1/models/nosuch HTTP/1.1\r\nHost: x\r\n\r\n"
        headers.append(("Content-Length", str(len(body))))
        note = f"GET {predict} with a {len(body)}-byte body (a request of its own)"
    request = http_request(method, predict, body, headers, version, content_length=not manual_length)
    return Case("rest", "headers", "http", request, answer_due=answer_due, keepalive_check=keepalive, note=note)


def _raw_case(draw, rng: random.Random, material: Material) -> Case:
    choice = draw(st.sampled_from(["random", "mutated", "line", "h2", "tls", "blank", "long", "nul", "partial"]))
    valid = valid_rest_request(material.controls[0])
    if choice == "random":
        data = _random_bytes(rng, rng.choice([1, 10, 100, 1000, 20000]))
    elif choice == "mutated":
        data = _flip_bits(rng, valid[:200])[0] + valid[200:]
    elif choice == "line":
        data = draw(st.binary(max_size=80)) + b"\r\n\r\n"
    elif choice == "h2":
        data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _random_bytes(rng, 30)
    elif choice == "tls":
        data = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + _random_bytes(rng, 100)
    elif choice == "blank":
        data = b"\r\n" * rng.choice([1, 2, 100])
    elif choice == "long":
        data = b"GET /" + b"a" * rng.choice([65530, 65537, 100_000]) + b" HTTP/1.1\r\n\r\n"
    elif choice == "nul":
        data = b"GET /v1/models/mnist\x00 HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        data = valid[:rng.randrange(1, len(valid))]
    return Case("rest", "raw", "tcp", data, answer_due=False, note=f"raw {choice}")


# --------------------------------------------------------------------------------------------------- gRPC cases

DTYPES = sorted(types_pb2.DataType.values())
DIMS = st.sampled_from([0, 1, 1, 2, 3, 8, 28]) | st.integers(-3, 64) | st.sampled_from(
    [-1, 1000, 10**5, 10**6, 10**7, 5 * 10**7, 2 * 10**8, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1])
MAX_FILLED = 4096  # values written into a tensor at most: the proto stays small, the declared shape need not


def model_spec(draw, spec) -> str:
    spec.name = draw(st.sampled_from([MODEL_NAME] * 8 + ["", "MNIST", "mnist\x00", "../mnist", "mnist/1", "*",
                                                         "m" * 20000]) | st.text(max_size=30))
    choice = draw(st.sampled_from(["none", "none", "version", "label"]))
    if choice == "version":
        spec.version.value = draw(st.sampled_from([0, 1, 1, 2, -1]) | st.integers(-(2**63), 2**63 - 1))
    elif choice == "label":
        spec.version_label = draw(st.sampled_from(["stable", "canary", ""]) | st.text(max_size=30))
    if hasattr(spec, "signature_name"):
        spec.signature_name = draw(st.sampled_from(["", "", "serving_default", "predict_pixels",
                                                    "__saved_model_init_op"]) | st.text(max_size=20))
    return f"model {spec.name[:40]!r} {choice}"


def _fill(draw, rng: random.Random, tensor, dtype: int, count: int, material: Material) -> str:
    if dtype == types_pb2.DT_STRING:
        source, total = draw(st.sampled_from(["controls", "mutated", "random"])), 0
        for _ in range(count):
            if total > 2**20:
                value = b""  # the request stays around 1 MB; the count is kept
            elif source == "controls":
                value = rng.choice(material.controls)
            elif source == "mutated":
                value = mutate_image(rng, material)[0]
            else:
                value = _random_bytes(rng, rng.randrange(0, 64))
            tensor.string_val.append(value)
            total += len(value)
        return f"{count} {source} strings"
    field_name = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                  types_pb2.DT_INT64: "int64_val", types_pb2.DT_BOOL: "bool_val", types_pb2.DT_HALF: "half_val",
                  types_pb2.DT_BFLOAT16: "half_val", types_pb2.DT_UINT32: "uint32_val",
                  types_pb2.DT_UINT64: "uint64_val", types_pb2.DT_COMPLEX64: "scomplex_val",
                  types_pb2.DT_COMPLEX128: "dcomplex_val"}.get(dtype, "int_val")
    if rng.random() < 0.1:  # the values in a field that does not belong to the dtype
        field_name = draw(st.sampled_from(["float_val", "int_val", "string_val", "int64_val", "half_val"]))
    values = getattr(tensor, field_name)
    if field_name in ("float_val", "double_val", "scomplex_val", "dcomplex_val"):
        special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e38, 5e-324]
        values.extend(rng.choice(special) if rng.random() < 0.1 else rng.random()
                      for _ in range(count * (2 if "complex" in field_name else 1)))
    elif field_name == "string_val":
        values.extend(_random_bytes(rng, rng.randrange(8)) for _ in range(count))
    elif field_name == "bool_val":
        values.extend(rng.random() < 0.5 for _ in range(count))
    else:
        low, high = {"int_val": (-(2**31), 2**31 - 1), "int64_val": (-(2**63), 2**63 - 1), "half_val": (0, 2**31 - 1),
                     "uint32_val": (0, 2**32 - 1), "uint64_val": (0, 2**64 - 1)}[field_name]
        values.extend(rng.randint(low, high) for _ in range(count))
    return f"{count} in {field_name}"


def tensor_proto(draw, rng: random.Random, material: Material, tensor) -> str:
    """A TensorProto of any dtype and shape; how many values it carries is drawn apart from what it declares."""
    dtype = draw(st.sampled_from([types_pb2.DT_STRING] * 4 + [types_pb2.DT_FLOAT] * 2) | st.sampled_from(DTYPES)
                 | st.integers(-3, 400))
    tensor.dtype = dtype
    if rng.random() < 0.05:
        tensor.tensor_shape.unknown_rank = True
    dims = draw(st.lists(DIMS, max_size=4))
    for size in dims:
        tensor.tensor_shape.dim.add(size=size, name=draw(st.sampled_from(["", "", "batch"]) | st.text(max_size=6)))
    declared = math.prod(dims) if dims else 1
    carried = draw(st.sampled_from(["declared", "declared", "declared", "one", "none", "fewer", "more", "content"]))
    if carried == "content":  # raw bytes in tensor_content, of a size that may or may not fit the shape
        size = draw(st.sampled_from([0, 1, 3, 4, 8, 4 * 784, 100_000]))
        if 0 < declared <= MAX_FILLED and draw(st.booleans()):
            size = declared * draw(st.sampled_from([1, 2, 4, 8, 16]))
        tensor.tensor_content = _random_bytes(rng, size)
        return f"dtype {dtype} dims {dims}, {size} bytes of tensor_content"
    count = {"declared": declared if 0 <= declared <= MAX_FILLED else 1, "one": 1, "none": 0,
             "fewer": max(0, min(declared, MAX_FILLED) - 1), "more": min(max(declared, 0), MAX_FILLED) + 1}[carried]
    return f"dtype {dtype} dims {dims}, " + _fill(draw, rng, tensor, dtype, count, material)


def predict_request(draw, rng: random.Random, material: Material) -> tuple[predict_pb2.PredictRequest, str, int | None]:
    request = predict_pb2.PredictRequest()
    style = draw(st.sampled_from(["near-valid", "near-valid", "generated"]))
    images = None
    if style == "near-valid":  # a valid request with one thing changed, to get past the first checks
        n = draw(st.sampled_from([1, 1, 2, 5]))
        pixels = draw(st.booleans())
        request.model_spec.name = MODEL_NAME
        if pixels:
            request.model_spec.signature_name = "predict_pixels"
            tensor = request.inputs["pixels"]
            tensor.dtype = types_pb2.DT_FLOAT
            for size in (n, 28, 28, 1):
                tensor.tensor_shape.dim.add(size=size)
            tensor.tensor_content = np.stack([material.pixels[i % len(material.pixels)] for i in range(n)]).tobytes()
        else:
            request.CopyFrom(valid_predict([material.controls[i % len(material.controls)] for i in range(n)]))
        change = draw(st.sampled_from(["none", "spec", "input-name", "extra-input", "output-filter", "dtype", "dims",
                                       "tensor", "signature"]))
        name = "pixels" if pixels else "image_bytes"
        if change == "none":
            images = n
        elif change == "spec":
            request.model_spec.Clear()
            model_spec(draw, request.model_spec)
        elif change == "input-name":
            request.inputs[draw(st.text(max_size=20) | st.just(""))].CopyFrom(request.inputs[name])
            del request.inputs[name]
        elif change == "extra-input":
            tensor_proto(draw, rng, material, request.inputs[draw(st.sampled_from(["pixels", "image_bytes", "x"]))])
        elif change == "output-filter":
            request.output_filter.extend(draw(st.lists(st.sampled_from(["digit", "probabilities", "probability", "",
                                                                        "x"]) | st.text(max_size=10), max_size=4)))
        elif change == "dtype":
            request.inputs[name].dtype = draw(st.sampled_from(DTYPES) | st.integers(-3, 400))
        elif change == "dims":
            tensor = request.inputs[name]
            tensor.tensor_shape.Clear()
            for size in draw(st.lists(DIMS, max_size=5)):
                tensor.tensor_shape.dim.add(size=size)
        elif change == "tensor":
            request.inputs[name].Clear()
            tensor_proto(draw, rng, material, request.inputs[name])
        else:
            request.model_spec.signature_name = draw(st.sampled_from(["predict_pixels", "serving_default", "x", ""]))
        return request, f"near-valid {'pixels' if pixels else 'images'} x{n}, {change}", images
    note = model_spec(draw, request.model_spec)
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        name = draw(st.sampled_from(["image_bytes", "image_bytes", "pixels", ""]) | st.text(max_size=12))
        note += "; " + name[:20] + ": " + tensor_proto(draw, rng, material, request.inputs[name])
    if rng.random() < 0.2:
        request.output_filter.extend(draw(st.lists(st.text(max_size=12), max_size=3)))
    return request, "generated: " + note, None


def grpc_message(draw, rng: random.Random, material: Material, method: str):
    """A generated request for the method, and a note."""
    cls = GRPC_METHODS[method]
    if cls is predict_pb2.PredictRequest:
        request, note, images = predict_request(draw, rng, material)
        return request, note, images
    request = cls()
    note = ""
    if hasattr(request, "model_spec"):
        note = model_spec(draw, request.model_spec)
    if cls is get_model_metadata_pb2.GetModelMetadataRequest:
        fields = draw(st.sampled_from([["signature_def"], ["signature_def"], [], ["x"], ["signature_def"] * 2,
                                       ["signature_def", "x"]]) | st.lists(st.text(max_size=10), max_size=3))
        request.metadata_field.extend(fields)
        note += f", fields {fields}"
    elif cls in (classification_pb2.ClassificationRequest, regression_pb2.RegressionRequest):
        if draw(st.booleans()):
            request.model_spec.signature_name = "classification"
        note += "; " + _examples(draw, rng, material, request.input)
    elif cls is inference_pb2.MultiInferenceRequest:
        for _ in range(draw(st.integers(0, 2))):
            task = request.tasks.add()
            model_spec(draw, task.model_spec)
            if draw(st.booleans()):
                task.model_spec.signature_name = "classification"
            task.method_name = draw(st.sampled_from(["tensorflow/serving/classify", "tensorflow/serving/regress", "x",
                                                     ""]))
        note += "; " + _examples(draw, rng, material, request.input)
    elif cls is model_management_pb2.ReloadConfigRequest:
        # Only configs the server must refuse, or an empty one (no action): a config it accepts would change the
        # models under test, and the control digits would no longer be answered by the model they came from.
        if draw(st.integers(0, 4)):
            entries = request.config.model_config_list.config
            for _ in range(draw(st.integers(1, 3))):
                entries.add(name=draw(st.sampled_from([MODEL_NAME, ""]) | st.text(max_size=10)),
                            base_path=draw(st.sampled_from(["/", "/tmp", "/etc/passwd", "", "models/mnist"])))
            flaw = draw(st.sampled_from(["duplicate", "platform", "no base path", "label"]))
            bad = entries.add(name=entries[0].name if flaw == "duplicate" else MODEL_NAME + "-new", base_path="/tmp")
            if flaw == "platform":
                bad.model_platform = draw(st.sampled_from(["pytorch", "tensorflow ", "TENSORFLOW"]))
            elif flaw == "no base path":
                bad.base_path = ""
            elif flaw == "label":
                bad.version_labels["stable"] = draw(st.integers(-(2**63), 2**63 - 1))
            note += f", a config with a {flaw}"
    return request, note, None


def _examples(draw, rng: random.Random, material: Material, request_input) -> str:
    """tf.Examples for Classify and MultiInference: images (control digits or mutated files) in the feature the
    classification signature reads or another, mostly one per example, sometimes in a context."""
    with_context = draw(st.integers(0, 3)) == 0
    listed = request_input.example_list_with_context if with_context else request_input.example_list
    feature = draw(st.sampled_from([FEATURE] * 4 + ["image_bytes", ""]))
    count = draw(st.sampled_from([0, 1, 1, 2, 3, 8]))
    for _ in range(count):
        values = listed.examples.add().features.feature[feature]
        image = rng.choice(material.controls) if rng.random() < 0.7 else mutate_image(rng, material)[0]
        if draw(st.integers(0, 9)) == 0:
            values.int64_list.value.append(7)
        else:
            values.bytes_list.value.extend([image] * draw(st.sampled_from([1, 1, 1, 0, 2])))
    if with_context:
        listed.context.features.feature[feature].bytes_list.value.append(rng.choice(material.controls))
    return f"{count} examples, feature {feature!r}{' with a context' if with_context else ''}"


def grpc_case(data, rng: random.Random, material: Material) -> Case:
    draw = data.draw
    kind = draw(st.sampled_from(["proto"] * 12 + ["bytes"] * 3 + ["mutated"] * 2 + ["other-message", "unknown-method",
                                                                                   "tcp"]))
    method = draw(st.sampled_from([PREDICTION + "Predict"] * 6 + list(GRPC_METHODS)))
    if kind in ("bytes", "other-message") and method.endswith("/HandleReloadConfigRequest"):
        # bytes that parse as a config of no models would be obeyed: every model unloaded, as TF Serving does
        method = PREDICTION + "Predict"
    short = method.rsplit("/", 1)[1]
    if kind == "proto":
        request, note, images = grpc_message(draw, rng, material, method)
        return Case("grpc", short, "grpc", request.SerializeToString(), method=method, images=images, note=note)
    if kind == "bytes":
        size = draw(st.sampled_from([0, 1, 2, 5, 16, 100, 1000, 65536, 500_000]))
        return Case("grpc", "bytes", "grpc", _random_bytes(rng, size), method=method, note=f"{size} random bytes")
    if kind == "mutated":
        valid = valid_predict([material.controls[0]]).SerializeToString()
        data_bytes = _flip_bits(rng, valid)[0] if draw(st.booleans()) else valid[:rng.randrange(len(valid))]
        return Case("grpc", "mutated", "grpc", data_bytes, method=PREDICTION + "Predict", note="valid Predict mutated")
    if kind == "other-message":
        other = draw(st.sampled_from(list(GRPC_METHODS)))
        request, note, _ = grpc_message(draw, rng, material, other)
        return Case("grpc", "other-message", "grpc", request.SerializeToString(), method=method,
                    note=f"a {other.rsplit('/', 1)[1]} request sent to {short}")
    if kind == "unknown-method":
        name = draw(st.sampled_from(["/tensorflow.serving.PredictionService/Nope", "/x/y", "/",
                                     "/tensorflow.serving.PredictionService/", "/grpc.health.v1.Health/Check",
                                     "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]))
        return Case("grpc", "unknown-method", "grpc", b"", method=name, note=name)
    data_bytes = draw(st.sampled_from([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"", b"PRI"]))
    return Case("grpc", "tcp", "tcp-grpc", data_bytes + _random_bytes(rng, rng.choice([0, 9, 100, 5000])),
                note="raw bytes on the gRPC port")


def image_case(data, rng: random.Random, material: Material) -> Case:
    draw = data.draw
    protocol = draw(st.sampled_from(["grpc", "rest"]))
    n = draw(st.sampled_from([1, 1, 1, 1, 2, 3, 8]))
    control = rng.random() < 0.15  # odds from rng: hypothesis favours 0 when it draws integers
    images, notes, controls = [], [], []
    if material.large and not control and rng.random() < 0.01:
        name, big = rng.choice(material.large)
        images, notes, n = [big], [name], 1
    else:
        for _ in range(n):
            if control or (n > 1 and rng.random() < 0.3):
                i = rng.randrange(len(material.controls))
                images.append(material.controls[i])
                controls.append(i)
                notes.append(f"control {i}")
            else:
                image, note = mutate_image(rng, material)
                images.append(image)
                notes.append(note)
    kind = f"{protocol}-{'batch' if n > 1 else 'single'}{'-control' if control else ''}"
    note = " | ".join(notes)[:400]
    if protocol == "grpc":
        return Case("image", kind, "grpc", valid_predict(images).SerializeToString(), method=PREDICTION + "Predict",
                    images=n, controls=controls if control else None, note=note)
    layout = draw(st.sampled_from(["instances", "named", "columnar"]))
    encoded = [{"b64": _b64(image)} for image in images]
    body = {"instances": {"instances": encoded}, "named": {"instances": [{"image_bytes": e} for e in encoded]},
            "columnar": {"inputs": {"image_bytes": encoded}}}[layout]
    return Case("image", kind, "http", http_request("POST", f"/v1/models/{MODEL_NAME}:predict",
                                                     json.dumps(body).encode()),
                keepalive_check=True, images=n, controls=controls if control else None, note=f"{layout}: {note}")


GENERATORS = {"rest": rest_case, "grpc": grpc_case, "image": image_case}


# --------------------------------------------------------------------------------------------------------- a phase

@dataclass
class Budget:
    seconds: float
    cases: int | None = None
    started: float = field(default_factory=time.monotonic)
    produced: int = 0
    stopped: bool = False

    def done(self) -> bool:
        return self.stopped or time.monotonic() - self.started >= self.seconds or \
            (self.cases is not None and self.produced >= self.cases)


@dataclass
class Settings:
    duration: float = 120.0
    cases: int | None = None
    concurrency: int = 3
    seed: int = 0
    timeout: float = 60.0
    spike_mb: float = 256.0
    max_growth_mb: float = 100.0
    replays: int = 8
    probe_every: float = 0.0


class PhaseRun:
    """Generates cases with hypothesis, sends them from worker threads, tallies the outcomes."""

    def __init__(self, target: Target, material: Material, settings: Settings, budget: Budget,
                 reference: list[list[float]] | None) -> None:
        self.target, self.material, self.settings, self.budget = target, material, settings, budget
        self.reference = reference
        self.queue: queue.Queue[Case | None] = queue.Queue(maxsize=settings.concurrency * 2)
        self.lock = threading.Lock()
        self.outcomes: dict[str, Counter] = {family: Counter() for family in FAMILIES}
        self.kinds: dict[str, Counter] = {family: Counter() for family in FAMILIES}
        self.failures: list[dict] = []
        self.slowest: list[tuple[float, dict]] = []
        self.in_flight: dict[int, Case] = {}
        self.recent: list[Case] = []
        self.spikes: list[dict] = []
        self.peak_seen = target.status("VmHWM")
        self.died = False

    def produce(self, chunk: int = 30) -> None:
        """Rounds of `chunk` cases of one family each, the families in turn, each round a fresh hypothesis
        run with its own seed (a family drawn by hypothesis itself comes out unevenly)."""
        round_ = 0
        while not self.budget.done():
            generate = self._generator(FAMILIES[round_ % len(FAMILIES)], self.settings.seed * 100_000 + round_, chunk)
            generate()
            round_ += 1

    def _generator(self, family: str, seed: int, chunk: int) -> Callable[[], None]:
        @hypothesis_settings(max_examples=chunk, deadline=None, database=None, phases=[Phase.generate],
                             suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                             report_multiple_bugs=False, print_blob=False)
        @hypothesis_seed(seed)
        @given(st.data())
        def generate(data) -> None:
            # Always the same draws, budget or not: hypothesis checks that a run draws as the runs before it
            # did, so the cases left in a round once the budget is spent are made and dropped (a few ms each).
            rng = data.draw(st.randoms(use_true_random=True), label="rng")
            try:
                case = GENERATORS[family](data, rng, self.material)
            except Exception as e:  # a bug of the harness: counted as a failure, the run goes on
                if "hypothesis" in type(e).__module__:  # its own control flow (a draw past its buffer)
                    raise
                with self.lock:
                    self.outcomes[family]["harness error"] += 1
                    self.failures.append({"failure": f"the fuzzer failed to make a case: {type(e).__name__}: {e}"[:300],
                                          "family": family, "kind": "harness", "outcome": "harness error"})
                return
            while not self.budget.done():
                try:
                    self.queue.put(case, timeout=0.2)
                    self.budget.produced += 1
                    return
                except queue.Full:
                    continue

        return generate

    def work(self) -> None:
        while True:
            case = self.queue.get()
            if case is None:
                return
            with self.lock:
                self.in_flight[id(case)] = case
            try:
                outcome = send(case, self.target, self.settings.timeout, self.reference)
            except Exception as e:  # a bug of the harness: shown as a failure, so that it gets fixed
                outcome = Outcome("harness error", f"the fuzzer itself failed: {type(e).__name__}: {e}"[:300])
            peak = self.target.status("VmHWM")
            with self.lock:
                others = [c for key, c in self.in_flight.items() if key != id(case)]
                del self.in_flight[id(case)]
                self.recent = [*self.recent[-5:], case]
                self._record(case, outcome)
                if peak - self.peak_seen > self.settings.spike_mb:
                    self.spikes.append({"peak_mb": round(peak, 1), "rise_mb": round(peak - self.peak_seen, 1),
                                        "suspects": [case, *others]})
                if not math.isnan(peak):
                    self.peak_seen = max(self.peak_seen, peak)
                if not self.target.alive() and not self.died:
                    self.died = True
                    self.budget.stopped = True
                    self.failures.append({"failure": "the server process died", "family": case.family,
                                          "kind": case.kind, "outcome": outcome.label,
                                          "suspects": [c.reproducer() for c in [*others, *self.recent[::-1]]]})

    def _record(self, case: Case, outcome: Outcome) -> None:
        self.outcomes[case.family][outcome.label] += 1
        self.kinds[case.family][case.kind] += 1
        if outcome.failure:
            self.failures.append({"failure": outcome.failure, "family": case.family, "kind": case.kind,
                                  "outcome": outcome.label, "seconds": round(outcome.seconds, 3),
                                  "detail": outcome.detail, "input": case.reproducer()})
        if outcome.seconds >= SLOW_SECONDS or len(self.slowest) < 5 or outcome.seconds > self.slowest[-1][0]:
            self.slowest.append((outcome.seconds, {"seconds": round(outcome.seconds, 2), "outcome": outcome.label,
                                                   "input": case.reproducer()}))
            self.slowest.sort(key=lambda item: -item[0])
            self.slowest = self.slowest[:5]

    def run(self) -> None:
        workers = [threading.Thread(target=self.work, daemon=True) for _ in range(self.settings.concurrency)]
        for worker in workers:
            worker.start()
        try:
            self.produce()
        finally:
            for _ in workers:
                self.queue.put(None)
            for worker in workers:
                worker.join(self.settings.timeout + 10)


def control_answers(target: Target, material: Material, timeout: float = 60) -> tuple[list, list[str]]:
    """Each control digit alone over gRPC and REST: the probabilities (gRPC's), and what went wrong."""
    problems, reference = [], []
    call = target.call(PREDICTION + "Predict")
    for i, png in enumerate(material.controls):
        try:
            digits, probabilities = _digits_from_grpc(call(valid_predict([png]).SerializeToString(), timeout=timeout))
            reference.append(probabilities[0])
        except grpc.RpcError as e:
            problems.append(f"control {i} over gRPC: {e.code().name} {e.details()}"[:300])
            reference.append(None)
            continue
        raw, error = exchange(target.rest_port, valid_rest_request(png), timeout)
        answers, unreadable = parse_answers(raw)
        if not answers or answers[0].status != 200:
            problems.append(f"control {i} over REST: {answers[0].status if answers else error or unreadable}")
            continue
        rest_digits, _ = _digits_from_json(answers[0].body)
        if rest_digits != digits:
            problems.append(f"control {i}: REST answered {rest_digits}, gRPC {digits}")
    return reference, problems


def replay(target: Target, cases: list[Case], settings: Settings) -> list[dict]:
    """Each case alone, the peak memory it costs above the RSS before it (VmHWM reset first)."""
    results = []
    for case in cases:
        time.sleep(0.2)
        before = target.status("VmRSS")
        reset = target.reset_peak()
        outcome = send(case, target, settings.timeout, None)
        peak = target.status("VmHWM")
        results.append({"outcome": outcome.label, "seconds": round(outcome.seconds, 2),
                        "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1),
                        "peak_rise_mb": round(peak - before, 1) if reset else None, "input": case.reproducer()})
    return results


def run_phase(target: Target, material: Material, settings: Settings, budget: Budget,
              progress: Callable[[str], None] = print) -> dict:
    """Fuzzes a running server until the budget is spent; the phase's summary."""
    target.follow_up = valid_rest_request(material.controls[0])
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    reference, start_problems = control_answers(target, material)
    rss_start = target.status("VmRSS")
    started = time.monotonic()

    probes: list[dict] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, target.status("VmRSS")))
            stop.wait(0.5)

    def probe() -> None:  # what holds the memory: Python's heap, glibc's bytes in use and free in its arenas
        while not stop.wait(settings.probe_every):
            report = target.probe()
            probes.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(target.status("VmRSS"), 1),
                           **{key: report.get(key) for key in ("python_traced_mb", "glibc", "python_grown",
                                                              "threads", "error")}})

    threads = [threading.Thread(target=sample, daemon=True)]
    if settings.probe_every and target.probe:
        threads.append(threading.Thread(target=probe, daemon=True))
    for thread in threads:
        thread.start()
    budget.started = time.monotonic()
    phase = PhaseRun(target, material, settings, budget, reference)
    try:
        phase.run()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    seconds = time.monotonic() - budget.started
    peak = target.status("VmHWM")
    failures = list(phase.failures)
    for problem in start_problems:
        failures.append({"failure": f"the control digits at the start: {problem}", "family": "check", "kind": "start"})
    end_reference, end_problems = control_answers(target, material) if target.alive() else (None, ["server is dead"])
    for problem in end_problems:
        failures.append({"failure": f"the control digits at the end: {problem}", "family": "check", "kind": "end"})
    if reference and end_reference:
        for i, (before, after) in enumerate(zip(reference, end_reference)):
            if before and after and int(np.argmax(after)) != int(np.argmax(before)) and \
                    before[int(np.argmax(after))] < max(before) - 1e-3:
                failures.append({"failure": f"control {i} answered differently at the end", "family": "check",
                                 "kind": "end"})
    time.sleep(0.5)
    rss_end = target.status("VmRSS")
    # The jumps of VmHWM: their suspects replayed one by one, alone, to find which input costs the memory.
    spike_cases, seen = [], set()
    for spike in phase.spikes:
        for case in spike["suspects"]:
            if id(case) not in seen and len(spike_cases) < settings.replays:
                seen.add(id(case))
                spike_cases.append(case)
    replays = replay(target, spike_cases, settings) if spike_cases and target.alive() else []
    for result in replays:
        if result["peak_rise_mb"] is not None and result["peak_rise_mb"] > settings.spike_mb:
            failures.append({"failure": f"one request raised the server's peak memory by {result['peak_rise_mb']:.0f} "
                                        f"MB (more than {settings.spike_mb:.0f})", "family": result["input"]["family"],
                             "kind": result["input"]["kind"], "outcome": result["outcome"], "input": result["input"]})
    rss = [mb for _, mb in samples if not math.isnan(mb)] or [rss_start]
    # Warm-up (TensorFlow's and glibc's pools filling) is not growth: what counts is RSS at the end against
    # the median RSS of the run's second quarter (a median, so a passing spike does not move it).
    warm = float(np.median([mb for t, mb in samples if seconds / 4 <= t <= seconds / 2 and not math.isnan(mb)]
                           or [rss_start]))
    memory = {"rss_start_mb": round(rss_start, 1), "rss_warm_mb": round(warm, 1), "rss_max_mb": round(max(rss), 1),
              "peak_hwm_mb": round(peak, 1), "rss_end_mb": round(rss_end, 1),
              "growth_mb": round(rss_end - rss_start, 1), "late_growth_mb": round(rss_end - warm, 1),
              "samples": [[round(t, 1), round(mb, 1)] for t, mb in samples[::max(1, len(samples) // 120)]],
              "spikes": [{"peak_mb": s["peak_mb"], "rise_mb": s["rise_mb"],
                          "suspects": len(s["suspects"])} for s in phase.spikes],
              "replays": replays, "probes": probes}
    if not math.isnan(rss_end) and rss_end - warm > settings.max_growth_mb:
        failures.append({"failure": f"RSS grew by {rss_end - warm:.0f} MB from the run's second quarter to its end "
                                    f"(more than {settings.max_growth_mb:.0f})", "family": "memory", "kind": "growth"})
    log = target.log_findings()
    if log["tracebacks"]:
        failures.append({"failure": f"the server logged {log['tracebacks']} traceback(s)", "family": "log",
                         "kind": "traceback", "detail": "\n".join(log["lines"][:40])})
    cases = sum(sum(c.values()) for c in phase.outcomes.values())
    progress(f"{cases} cases in {seconds:.0f} s, {len(failures)} failure(s)")
    return {"seconds": round(seconds, 1), "cases": cases,
            "by_family": {family: {"cases": sum(phase.outcomes[family].values()),
                                   "outcomes": dict(phase.outcomes[family].most_common()),
                                   "kinds": dict(phase.kinds[family].most_common())} for family in FAMILIES},
            "failures": group_failures(failures), "failure_count": len(failures), "memory": memory,
            "slowest": [item for _, item in phase.slowest], "server_log": log,
            "control_digits": [int(np.argmax(p)) if p else None for p in reference]}


def group_failures(failures: list[dict]) -> list[dict]:
    """Failures of one kind together: how many, and the three smallest inputs."""
    groups: dict[tuple, dict] = {}
    for failure in failures:
        key = (failure["failure"][:60], failure.get("family"), failure.get("kind"))
        group = groups.setdefault(key, {"failure": failure["failure"], "family": failure.get("family"),
                                        "kind": failure.get("kind"), "count": 0, "examples": []})
        group["count"] += 1
        group["examples"].append({k: v for k, v in failure.items() if k not in ("failure", "family", "kind")})
    for group in groups.values():
        group["examples"] = sorted(group["examples"], key=lambda e: e.get("input", {}).get("bytes", 0))[:3]
    return sorted(groups.values(), key=lambda g: -g["count"])


# ------------------------------------------------------------------------------------------------- the server

class FuzzedServer(ServerProcess):
    """The embedded server as a subprocess, its address space limited, its log scanned for tracebacks."""

    def __init__(self, command: list[str], address_space_mb: int, env: dict[str, str] | None = None) -> None:
        def limit() -> None:
            if address_space_mb:
                size = address_space_mb * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (size, size))

        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", preexec_fn=limit, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.tracebacks = 0
        self.traceback_lines: list[str] = []
        self._in_traceback = 0
        self.wait_ready()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines = [*self.lines[-200:], line]
            if line.startswith("Traceback") or " ERROR " in line:
                self.tracebacks += line.startswith("Traceback")
                self._in_traceback = 40
            if self._in_traceback and len(self.traceback_lines) < 400:
                self.traceback_lines.append(line.rstrip()[:300])
                self._in_traceback -= 1

    def findings(self) -> dict:
        return {"tracebacks": self.tracebacks, "lines": self.traceback_lines[:200]}


def server_command(base: Path, batching: bool, extra: list[str], probed: bool = False) -> list[str]:
    """The server's command; `probed`, through bench.soak's launcher, which writes its accounts at each SIGUSR1
    (tracemalloc on: slower)."""
    module = ("bench.soak", "serve") if probed else ("serving.server",)
    command = [sys.executable, "-m", *module, f"--model_name={MODEL_NAME}", f"--model_base_path={base}",
               "--port=0", "--rest_api_port=0", "--host=127.0.0.1", "--file_system_poll_wait_seconds=0",
               f"--monitoring_config_file={ROOT / 'serving' / 'monitoring.config'}", *SERVER_FLAGS]
    if batching:
        command += ["--enable_batching=true", f"--batching_parameters_file={ROOT / 'serving' / 'batching.config'}"]
    return command + extra


def counters(server: FuzzedServer) -> dict:
    try:
        return server.counters()
    except OSError as e:
        return {"error": str(e)}


# ----------------------------------------------------------------------------------------------------- report

def markdown(results: dict) -> str:
    lines = ["| phase | family | cases | outcomes (most frequent first) | failures |",
             "| --- | --- | --- | --- | --- |"]
    for phase in results["phases"]:
        failed = Counter()
        for group in phase["failures"]:
            failed[group["family"]] += group["count"]
        for family, tally in phase["by_family"].items():
            outcomes = ", ".join(f"{label} {count}" for label, count in list(tally["outcomes"].items())[:6])
            lines.append(f"| {phase['name']} | {family} | {tally['cases']:,} | {outcomes} | {failed[family]} |")
        for family in sorted(set(failed) - set(FAMILIES)):
            lines.append(f"| {phase['name']} | {family} | | | {failed[family]} |")
    lines.append("")
    for phase in results["phases"]:
        m = phase["memory"]
        lines.append(f"{phase['name']}: {phase['cases']:,} cases in {phase['seconds']:.0f} s; server RSS start "
                     f"{m['rss_start_mb']:.0f} MB, second quarter (median) {m['rss_warm_mb']:.0f} MB, max "
                     f"{m['rss_max_mb']:.0f} MB (peak VmHWM {m['peak_hwm_mb']:.0f} MB), "
                     f"end {m['rss_end_mb']:.0f} MB; {len(m['spikes'])} memory jump(s) replayed; "
                     f"{phase['failure_count']} failure(s).")
    lines.append("")
    for phase in results["phases"]:
        for group in phase["failures"]:
            example = group["examples"][0] if group["examples"] else {}
            reproducer = example.get("input", {})
            lines.append(f"- FAILURE ({phase['name']}, {group['family']}/{group['kind']}, x{group['count']}): "
                         f"{group['failure']}; e.g. {reproducer.get('head', example.get('detail', ''))[:200]}")
    lines.append(f"\nResult: {'no failure' if results['ok'] else 'FAILURES found'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist"), help="base path or version directory")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of fuzzing in all (split by phase)")
    parser.add_argument("--cases", type=int, help="stop after this many cases in all (split by phase)")
    parser.add_argument("--smoke", action="store_true", help="300 cases, batching on: proves it all works")
    parser.add_argument("--batching", choices=("on", "off", "both"), default="both")
    parser.add_argument("--concurrency", type=int, default=3, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take before it fails")
    parser.add_argument("--spike-mb", type=float, default=256.0,
                        help="a rise of VmHWM above this after a case is replayed; a failure if one input does it")
    parser.add_argument("--max-growth-mb", type=float, default=100.0,
                        help="RSS growth allowed from the median RSS of a phase's second quarter to its end")
    parser.add_argument("--address-space-mb", type=int, default=6144, help="RLIMIT_AS of the server; 0: none")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "tfds"), help="MNIST (tfds) for the digits")
    parser.add_argument("--no-large-images", action="store_true", help="leave out the 4096 px images")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for serving.server")
    parser.add_argument("--probe-every", type=float, default=0.0, metavar="SECONDS",
                        help="run the server through bench.soak's launcher and record its Python heap and glibc's "
                             "accounts (in use, free in arenas) this often (tracemalloc slows the server)")
    parser.add_argument("--out", type=Path, help="the summary as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases = args.cases or 300
        args.batching = "on" if args.batching == "both" else args.batching
    settings = Settings(duration=args.duration, cases=args.cases, concurrency=args.concurrency, seed=args.seed,
                        timeout=args.timeout, spike_mb=args.spike_mb, max_growth_mb=args.max_growth_mb,
                        probe_every=args.probe_every)

    def progress(message: str) -> None:
        print(f"[fuzz] {message}", flush=True)

    version = version_dir(args.model)
    material = Material.load(args.data_dir, large=not args.no_large_images)
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    (workdir / "1").symlink_to(version.resolve())
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.batching]
    results: dict = {"machine": machine(), "model": str(version.resolve()),
                     "command": "python -m bench.fuzz " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "settings": {"duration_s": args.duration, "cases": args.cases, "batching": args.batching,
                                  "concurrency": args.concurrency, "seed": args.seed, "timeout_s": args.timeout,
                                  "spike_mb": args.spike_mb, "max_growth_mb": args.max_growth_mb,
                                  "address_space_mb": args.address_space_mb, "server_flags": list(SERVER_FLAGS),
                                  "fine_grpc_codes": sorted(FINE_GRPC_CODES), "fine_http_5xx": sorted(FINE_HTTP_5XX)},
                     "phases": []}
    for i, batching in enumerate(modes):
        name = f"batching {'on' if batching else 'off'}"
        progress(f"{name}: starting the server")
        command = server_command(workdir, batching, args.server_arg, probed=bool(args.probe_every))
        probe_file = workdir / f"probe-{i}.json"
        server = FuzzedServer(command, args.address_space_mb,
                              env={soak.PROBE_FILE_ENV: str(probe_file)} if args.probe_every else None)
        probes_asked = iter(range(1, 1 << 30))
        target = Target(server.ports["rest_port"], server.ports["grpc_port"], server.proc.pid,
                        alive=lambda s=server: s.proc.poll() is None, log_findings=server.findings,
                        probe=lambda s=server, f=probe_file, n=probes_asked: soak.probe(s, f, next(n)))
        phase_settings = Settings(**{**settings.__dict__, "seed": args.seed * 10 + i})
        budget = Budget(args.duration / len(modes), None if args.cases is None else args.cases // len(modes))
        try:
            progress(f"{name}: fuzzing for {budget.seconds:.0f} s"
                     + (f" or {budget.cases} cases" if budget.cases else ""))
            summary = run_phase(target, material, phase_settings, budget, progress)
            summary["server_counters"] = counters(server) if target.alive() else {}
            summary["server_exit_code"] = server.proc.poll()
        finally:
            target.close()
            if server.proc.poll() is None:
                server.stop()
        summary["server_stopped_with"] = server.proc.returncode
        results["phases"].append({"name": name, "batching": batching, **summary})
    results["totals"] = {"cases": sum(p["cases"] for p in results["phases"]),
                         "by_family": {f: sum(p["by_family"][f]["cases"] for p in results["phases"]) for f in FAMILIES},
                         "failures": sum(p["failure_count"] for p in results["phases"])}
    results["ok"] = results["totals"]["failures"] == 0
    results["machine"]["load_average_at_end"] = os.getloadavg()
    table = markdown(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
