"""Ask the MNIST model which digit each image shows.

    python client/predict.py seven.png more/ [--protocol grpc] [--api classify] [--server host:port] [--json]

prints `seven.png: 7 (probability 0.9981)` for each image; a directory stands for the image files in it
(.png, .jpg, .jpeg, .gif, .bmp), sorted by name. Files are sent as they are, the model decodes them.
`--api classify` asks TF Serving's Classify (the export's `classification` signature) instead of Predict.
`--tls` (or `--ca FILE`, with `--cert FILE --key FILE` for a server that verifies clients) speaks gRPC over TLS to
a server started with `--ssl_config_file`; TF Serving's REST API has no TLS, so these go with `--protocol grpc`.

Exit status: 0 every image answered; 1 some image could not be read, is not an image or was rejected by
the server (the others are still answered); 2 bad usage; 3 the server could not be reached or did not
answer in time; 4 the server refused the request as a whole (unknown model, server error). An unknown
signature is, as in TF Serving, INVALID_ARGUMENT: it is reported for each image, with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

if not __package__:  # `python client/predict.py` puts client/ itself, not the repository, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.mnist_client import (
    APIS,
    DEFAULT_MODEL,
    DEFAULT_SIGNATURES,
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_BYTES,
    GrpcClient,
    Prediction,
    RestClient,
    ServingError,
)

EXIT_OK, EXIT_IMAGE_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_SERVER_ERROR = 0, 1, 2, 3, 4
REST_HAS_NO_TLS = ("TLS is for --protocol grpc only: TF Serving's REST API has no TLS (put a TLS-terminating "
                   "proxy in front of it)")
DEFAULT_PORTS = {"rest": 8501, "grpc": 8500}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
# Codes that blame what a request carries rather than the request itself: a batch that gets one is split.
_IMAGE_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


def looks_like_image(data: bytes) -> bool:
    """PNG, JPEG, GIF, BMP or WebP by the file's first bytes: a fast, clear error before a round trip."""
    return data.startswith(_MAGIC) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP")


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files as given; a directory becomes the image files in it, sorted (not recursive)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(str(Path(path) / name) for name in sorted(os.listdir(path))
                         if Path(name).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(Path(path) / name))
        else:
            files.append(path)
    return files


def read_image(path: str) -> bytes:
    """The file's bytes; ValueError with a reason fit for the user when it is unreadable or not an image."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_MESSAGE_BYTES:
                raise ValueError(f"too large: more than {MAX_MESSAGE_BYTES >> 20} MB")
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read: {e.strerror or e}") from None
    if not looks_like_image(data):
        raise ValueError("not an image (PNG, JPEG, GIF, BMP or WebP expected)")
    return data


def predict_files(client: RestClient | GrpcClient, files: Sequence[str], batch_size: int) -> Iterator[dict]:
    """One result per file, in order: {"file", "digit", "probability", "probabilities"} or {"file", "error"}.

    Raises ServingError when the server refuses the request as a whole, or cannot be reached.
    """
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        results = [{"file": path} for path in batch]
        images = {}
        for i, path in enumerate(batch):
            try:
                images[i] = read_image(path)
            except ValueError as e:
                results[i]["error"] = str(e)
        for i, outcome in _ask(client, images).items():
            results[i].update(outcome)
        yield from results


def _ask(client: RestClient | GrpcClient, images: dict[int, bytes]) -> dict[int, dict]:
    """The server's answer for each image. One bad image spoils a whole request, so a rejected batch is
    asked again image by image: the good ones get answered and the bad one gets the server's message."""
    if not images:
        return {}
    try:
        predictions = client.predict(list(images.values()))
    except ServingError as e:
        if e.code not in _IMAGE_CODES:
            raise
        if len(images) == 1:
            return {i: {"error": f"rejected by the server: {e}"} for i in images}
        return {i: outcome for key, image in images.items() for i, outcome in _ask(client, {key: image}).items()}
    return {i: _as_dict(p) for i, p in zip(images, predictions, strict=True)}


def wait_until_available(client: RestClient | GrpcClient, seconds: float) -> None:
    """Polls the model's status until a version is AVAILABLE: for scripts that have just started a server.
    Raises the last ServingError (or a DEADLINE_EXCEEDED one) when the time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if any(v.state == "AVAILABLE" for v in client.model_status()):
                return
            error = ServingError("DEADLINE_EXCEEDED", "no version of the model is AVAILABLE yet")
        except ServingError as e:
            if not (e.no_answer or e.code == "NOT_FOUND"):
                raise
            error = e
        if time.monotonic() >= deadline:
            raise error
        time.sleep(0.25)


def make_client(protocol: str, server: str, model: str, signature: str | None, timeout: float,
                api: str = "predict", *, tls: bool = False, ca: str | None = None, cert: str | None = None,
                key: str | None = None) -> RestClient | GrpcClient:
    """The client for protocol; tls, ca, cert and key are GrpcClient's (ValueError for REST, which has no TLS)."""
    if protocol == "grpc":
        with _native_stderr_silenced():
            return GrpcClient(server, model, signature, timeout, api, tls=tls, ca=ca, cert=cert, key=key)
    if tls or ca or cert or key:
        raise ValueError(REST_HAS_NO_TLS)
    return RestClient(server, model, signature, timeout, api)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Print the digit the MNIST model sees in each image.",
        epilog="exit status: 0 all answered, 1 some image failed, 2 usage, 3 server unreachable or timed out, "
               "4 request refused (unknown model, server error)",
    )
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories of them")
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest", help="default: rest")
    parser.add_argument("--server", help="host:port; default localhost:8501 for rest, localhost:8500 for grpc")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--api", choices=APIS, default="predict",
                        help="TF Serving API to call: predict, or classify with each image in a tf.Example "
                             "(default: predict)")
    parser.add_argument("--signature", help="default: " + ", ".join(f"{signature} for {api}"
                                                                    for api, signature in DEFAULT_SIGNATURES.items()))
    parser.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for each request (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--batch-size", type=_positive(int), default=32, help="images per request (default: 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON document with all results")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait up to SECONDS for the server to have a version AVAILABLE (default: 0)")
    tls = parser.add_argument_group(
        "TLS", "gRPC only, for a server started with --ssl_config_file (TF Serving's REST API has no TLS)")
    tls.add_argument("--tls", action="store_true",
                     help="gRPC over TLS, the server's certificate checked against grpc's default roots or --ca")
    tls.add_argument("--ca", metavar="FILE", help="PEM file of the CA certificates the server's certificate is "
                                                  "checked against (implies --tls)")
    tls.add_argument("--cert", metavar="FILE", help="PEM file of this client's certificate, for a server that "
                                                    "verifies clients (client_verify); with --key (implies --tls)")
    tls.add_argument("--key", metavar="FILE", help="PEM file of --cert's private key, unencrypted")
    args = parser.parse_args(argv)
    given = [flag for flag in ("tls", "ca", "cert", "key") if getattr(args, flag)]
    if given and args.protocol != "grpc":
        parser.error(f"{', '.join('--' + flag for flag in given)}: {REST_HAS_NO_TLS}")
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together: the client's certificate and its private key")
    args.tls = bool(given)
    args.server = args.server or f"localhost:{DEFAULT_PORTS[args.protocol]}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    files = expand_paths(args.paths)
    if not files:
        print("error: no image files in " + ", ".join(args.paths), file=sys.stderr)
        return EXIT_USAGE
    results = []
    # grpc logs a failed TLS handshake itself, at INFO, before the error below says the same in words; its errors
    # still show. grpc reads the setting when it loads, so a caller that has loaded it already keeps its own; a
    # GRPC_VERBOSITY the user set wins.
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        client = make_client(args.protocol, args.server, args.model, args.signature, args.timeout, args.api,
                             tls=args.tls, ca=args.ca, cert=args.cert, key=args.key)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    with client:
        try:
            if args.wait > 0:
                wait_until_available(client, args.wait)
            for result in predict_files(client, files, args.batch_size):
                results.append(result)
                if not args.json:
                    _print_result(result)
        except ServingError as e:
            print(f"error: {args.protocol} server {args.server}: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE if e.no_answer else EXIT_SERVER_ERROR
    if args.json:
        json.dump({"model": args.model, "server": args.server, "protocol": args.protocol, "api": args.api,
                   "results": results},
                  sys.stdout, indent=2)
        print()
        for result in results:
            if "error" in result:
                print(f"{result['file']}: error: {result['error']}", file=sys.stderr)
    return EXIT_IMAGE_FAILED if any("error" in r for r in results) else EXIT_OK


def _print_result(result: dict) -> None:
    if "error" in result:
        print(f"{result['file']}: error: {result['error']}", file=sys.stderr)
    else:
        print(f"{result['file']}: {result['digit']} (probability {result['probability']:.4f})", flush=True)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The stubs load TensorFlow, whose C++ start-up logs CUDA probing to file descriptor 2 before any
    log level applies; a user of this CLI has no use for it. Python's own errors still show: they are
    printed after the descriptor is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _as_dict(prediction: Prediction) -> dict:
    return {"digit": prediction.digit, "probability": prediction.probability,
            "probabilities": list(prediction.probabilities)}


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


if __name__ == "__main__":
    sys.exit(main())
