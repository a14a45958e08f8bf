"""Clients for the `mnist` model behind TF Serving or the embedded server, one per protocol, one interface.

    with RestClient("localhost:8501") as c:          # standard library only, no TensorFlow
        [p] = c.predict([open("seven.png", "rb").read()])
        p.digit, p.probability                        # 7, 0.998

    with GrpcClient("localhost:8500") as c:          # official tensorflow-serving-api stubs
        ...                                           # same calls, same answers

    GrpcClient("host:8500", ca="ca.pem")             # TLS, for a server started with --ssl_config_file
    GrpcClient("host:8500", ca="ca.pem", cert="client.pem", key="client.key")   # ... with client_verify

Images are sent as the raw bytes of their files; the model decodes them in its graph. `api="predict"` (the
default) calls Predict on `serving_default`; `api="classify"` calls TF Serving's Classify on the export's
`classification` signature, with each image in a tf.Example (feature `image/encoded`): the same answers, for
clients that speak the classification API. Every call has a deadline (`timeout`, seconds). Everything that
goes wrong on the way, from a refused connection or a failed TLS handshake to the server rejecting an image, is
raised as `ServingError`. TLS is gRPC's only, as in TF Serving, whose REST API has none.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

DEFAULT_MODEL = "mnist"
DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_SIGNATURE = "classification"
APIS = ("predict", "classify")
DEFAULT_SIGNATURES = {"predict": DEFAULT_SIGNATURE, "classify": CLASSIFY_SIGNATURE}
IMAGE_FEATURE = "image/encoded"  # the tf.Example feature the classification signature reads
DEFAULT_REST_SERVER = "localhost:8501"
DEFAULT_GRPC_SERVER = "localhost:8500"
DEFAULT_TIMEOUT = 10.0
INPUT_KEY = "image_bytes"
# The embedded server and docker-compose's TF Serving accept messages up to this size; gRPC's default is 4 MB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# How TF Serving's REST API maps its status codes to HTTP (tensorflow_serving/model_servers/http_server.cc),
# read backwards so that both clients name errors alike.
_HTTP_TO_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",  # the embedded server, for a body over its size limit
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ServingError(Exception):
    """The server refused a request, or no answer came.

    `code` is a gRPC status name for either protocol: what the gRPC server sent, the HTTP status of a REST
    answer mapped the way TF Serving maps it ("INVALID_ARGUMENT" for 400, ...), or, when no answer came,
    "UNAVAILABLE" (could not connect) or "DEADLINE_EXCEEDED" (no answer within the timeout).
    `http_status` is the HTTP status of a REST answer, else None. `message` is the server's own text.
    """

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status

    @property
    def no_answer(self) -> bool:
        """True when the server could not be reached or did not answer in time: retry later, elsewhere."""
        return self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Prediction:
    digit: int
    probability: float
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class ModelVersionStatus:
    version: int
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END (TF Serving's ModelVersionStatus.State)
    error_message: str = ""


def split_host_port(server: str, default_port: int) -> tuple[str, int]:
    """'host:port', 'host', ':port' or '[::1]:port' -> (host, port)."""
    host, sep, port = server.rpartition(":")
    if not sep or "]" in port:  # no port given (a bare IPv6 address in brackets counts as a host)
        host, port = server, str(default_port)
    host = host.strip("[]") or "localhost"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad server address {server!r}: expected host:port")
    return host, int(port)


class RestClient:
    """TF Serving's REST API over one kept-alive HTTP/1.1 connection (not thread-safe: one per thread)."""

    def __init__(
        self,
        server: str = DEFAULT_REST_SERVER,
        model: str = DEFAULT_MODEL,
        signature: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        api: str = "predict",
    ):
        self.host, self.port = split_host_port(server, 8501)
        self.model, self.api, self.timeout = model, _check_api(api), timeout
        self.signature = signature or DEFAULT_SIGNATURES[api]
        self._conn: http.client.HTTPConnection | None = None

    def predict(self, images: Sequence[bytes]) -> list[Prediction]:
        """One request for all `images` (raw bytes of encoded image files); answers in the same order."""
        if not images:
            return []
        if self.api == "classify":
            return self._classify(images)
        body = {
            "signature_name": self.signature,
            "instances": [{INPUT_KEY: {"b64": base64.b64encode(image).decode("ascii")}} for image in images],
        }
        answer = self._call("POST", f"/v1/models/{self.model}:predict", json.dumps(body).encode())
        try:
            predictions = [_prediction(row["digit"], row["probability"], row["probabilities"])
                           for row in answer["predictions"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ServingError("INTERNAL", f"unexpected answer from the server: {e!r}") from None
        _check_count(predictions, images)
        return predictions

    def _classify(self, images: Sequence[bytes]) -> list[Prediction]:
        body = {
            "signature_name": self.signature,
            "examples": [{IMAGE_FEATURE: {"b64": base64.b64encode(image).decode("ascii")}} for image in images],
        }
        answer = self._call("POST", f"/v1/models/{self.model}:classify", json.dumps(body).encode())
        try:
            predictions = [_classified(classes) for classes in answer["results"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ServingError("INTERNAL", f"unexpected answer from the server: {e!r}") from None
        _check_count(predictions, images)
        return predictions

    def model_status(self) -> list[ModelVersionStatus]:
        answer = self._call("GET", f"/v1/models/{self.model}")
        return [ModelVersionStatus(int(v["version"]), v["state"], v.get("status", {}).get("error_message", ""))
                for v in answer.get("model_version_status", [])]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = _NoDelayHTTPConnection(self.host, self.port, timeout=self.timeout)
            reused = self._conn.sock is not None
            try:
                status, data = _exchange(self._conn, method, path, body, headers)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self.close()
                # The server may close an idle kept-alive connection at any time; a fresh one gets one more
                # try (predict has no side effects, so repeating it is safe).
                if reused and attempt == 1:
                    continue
                raise ServingError("UNAVAILABLE", f"connection to {self.host}:{self.port} lost: {e!r}") from None
            except TimeoutError:
                self.close()
                raise ServingError("DEADLINE_EXCEEDED",
                                   f"no answer from {self.host}:{self.port} within {self.timeout} s") from None
            except OSError as e:
                self.close()
                raise ServingError("UNAVAILABLE", f"cannot reach {self.host}:{self.port}: {e.strerror or e}") \
                    from None
            except http.client.HTTPException as e:
                self.close()
                if isinstance(e, http.client.BadStatusLine) and e.line.startswith("\x00\x00"):
                    # An HTTP/2 frame (a gRPC server's SETTINGS) where an HTTP/1.1 status line was due.
                    message = (f"{self.host}:{self.port} answers HTTP/2, as a gRPC port does: use the REST port "
                               "(8501 by default), or gRPC (predict.py --protocol grpc)")
                    raise ServingError("INTERNAL", message) from None
                raise ServingError("INTERNAL", f"bad HTTP answer from {self.host}:{self.port}: {e!r}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status != 200:
            message = answer.get("error") if isinstance(answer, dict) else None
            message = message or data.decode("utf-8", "replace").strip() or http.client.responses.get(status, "")
            raise ServingError(_HTTP_TO_CODE.get(status, "UNKNOWN"), message, status)
        if not isinstance(answer, dict):
            raise ServingError("INTERNAL", f"answer is not a JSON object: {data[:200]!r}", status)
        return answer


class _NoDelayHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # Without it a request whose headers and body go out in two packets waits for a delayed ACK.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, bytes]:
    try:
        conn.request(method, path, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        # A server may answer and close before it has read the whole body (413 for a body over its limit):
        # its answer is still there to read. If not, getresponse raises and the caller sees a lost connection.
        pass
    response = conn.getresponse()
    return response.status, response.read()


class GrpcClient:
    """TF Serving's gRPC PredictionService and ModelService over one channel (thread-safe).

    Importing the official stubs loads TensorFlow (they are built on its protos), so they are imported here,
    when the first GrpcClient is made, and the REST path never pays for it.

    TLS, for a server started with `--ssl_config_file`: `tls=True` checks the server's certificate against
    grpc's default roots, `ca` (a PEM file) against the CAs in it instead; `cert` and `key` (PEM files, the key
    unencrypted) are the client certificate a server with `client_verify` asks for. Any of the three implies
    TLS. A file that cannot be read or is not what it should be raises ValueError naming it, before any call.
    """

    def __init__(
        self,
        server: str = DEFAULT_GRPC_SERVER,
        model: str = DEFAULT_MODEL,
        signature: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        api: str = "predict",
        *,
        tls: bool = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ):
        # make_ndarray comes with the stubs' TensorFlow anyway and reads every encoding of a tensor.
        import grpc
        from tensorflow import make_ndarray
        from tensorflow_serving.apis import (
            classification_pb2,
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )

        host, port = split_host_port(server, 8500)
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.model, self.api, self.timeout = model, _check_api(api), timeout
        self.signature = signature or DEFAULT_SIGNATURES[api]
        self._grpc, self._predict_pb2, self._status_pb2 = grpc, predict_pb2, get_model_status_pb2
        self._classification_pb2 = classification_pb2
        self._make_ndarray = make_ndarray
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.tls = tls or any(path is not None for path in (ca, cert, key))
        if self.tls:
            self._channel = grpc.secure_channel(self.target, _channel_credentials(ca, cert, key), options)
        else:
            self._channel = grpc.insecure_channel(self.target, options)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._predict, self._classify_rpc = stub.Predict, stub.Classify
        self._get_status = model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus

    def predict(self, images: Sequence[bytes]) -> list[Prediction]:
        """One request for all `images` (raw bytes of encoded image files); answers in the same order."""
        if not images:
            return []
        if self.api == "classify":
            return self._classify(images)
        request = self._predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = self.signature
        tensor = request.inputs[INPUT_KEY]
        tensor.dtype = 7  # DT_STRING (tensorflow/core/framework/types.proto)
        tensor.tensor_shape.dim.add(size=len(images))
        tensor.string_val.extend(images)
        response = self._rpc(self._predict, request)
        keys = ("digit", "probability", "probabilities")
        if missing := [key for key in keys if key not in response.outputs]:
            raise ServingError("INTERNAL", f"unexpected answer from the server: no output {', '.join(missing)}")
        try:
            digits, probability, probabilities = (self._make_ndarray(response.outputs[key]) for key in keys)
            predictions = [_prediction(d, p, ps) for d, p, ps in zip(digits, probability, probabilities, strict=True)]
        except (TypeError, ValueError) as e:
            raise ServingError("INTERNAL", f"unexpected answer from the server: {e!r}") from None
        _check_count(predictions, images)
        return predictions

    def _classify(self, images: Sequence[bytes]) -> list[Prediction]:
        request = self._classification_pb2.ClassificationRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = self.signature
        for image in images:
            request.input.example_list.examples.add().features.feature[IMAGE_FEATURE].bytes_list.value.append(image)
        response = self._rpc(self._classify_rpc, request)
        try:
            predictions = [_classified((c.label, c.score) for c in classifications.classes)
                           for classifications in response.result.classifications]
        except ValueError as e:
            raise ServingError("INTERNAL", f"unexpected answer from the server: {e!r}") from None
        _check_count(predictions, images)
        return predictions

    def model_status(self) -> list[ModelVersionStatus]:
        request = self._status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model
        response = self._rpc(self._get_status, request)
        state_name = self._status_pb2.ModelVersionStatus.State.Name
        return [ModelVersionStatus(v.version, state_name(v.state), v.status.error_message)
                for v in response.model_version_status]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rpc(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            code = e.code()
            message = e.details() or ""
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                message = f"no answer from {self.target} within {self.timeout} s ({message})"
            elif code == self._grpc.StatusCode.UNAVAILABLE:
                hint = _connection_hint(message, self.tls, self.target)
                message = f"cannot reach {self.target}: " + (f"{hint} (grpc: {message})" if hint else message)
            raise ServingError(code.name, message) from None


def _read_pem(path: str, what: str, marker: str) -> bytes:
    """The file's bytes; ValueError naming it when it cannot be read or holds no PEM block of that kind."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if marker.encode() not in data:
        raise ValueError(f"{path} is not a PEM {what} file (no '{marker}' in it)")
    return data


def _channel_credentials(ca: str | None, cert: str | None, key: str | None):
    """grpc's TLS credentials from PEM files, checked first with the standard library's ssl: grpc reads them only
    when it connects, and then says no more than "Failed to create security handshaker"."""
    import ssl

    import grpc

    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its private key go together: give both cert and key, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    root_certificates = None
    if ca is not None:
        root_certificates = _read_pem(ca, "CA certificates", "-----BEGIN CERTIFICATE-----")
        try:
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as e:
            raise ValueError(f"{ca}: cannot read its CA certificates ({e})") from None
    private_key = certificate_chain = None
    if cert is not None and key is not None:
        certificate_chain = _read_pem(cert, "certificate", "-----BEGIN CERTIFICATE-----")
        private_key = _read_pem(key, "private key", "PRIVATE KEY-----")

        def encrypted() -> bytes:  # called by ssl only for an encrypted key, which grpc cannot read
            raise ValueError(f"{key} is an encrypted private key: grpc needs it unencrypted")

        try:
            context.load_cert_chain(cert, key, password=encrypted)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{key} is not the private key of {cert}") from None
            raise ValueError(f"{cert} and {key}: not a PEM certificate and its private key ({e})") from None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _connection_hint(details: str, tls: bool, target: str) -> str:
    """What grpc's message about a failed connection means, in words, when it is about TLS; else ""."""
    if not tls:
        if "Socket closed" in details:
            return ("the server closed the connection: if its port serves TLS (tensorflow_model_server "
                    "--ssl_config_file), connect with TLS")
        return ""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return "TLS handshake failed: the server's certificate is not signed by a CA this client trusts"
    if "Hostname Verification" in details:
        return f"TLS handshake failed: the server's certificate is not issued for {target.rpartition(':')[0]}"
    if "WRONG_VERSION_NUMBER" in details:
        return "TLS handshake failed: the server does not speak TLS on this port"
    if "Socket closed" in details or "Connection reset" in details:
        return ("the server closed the connection after the TLS handshake: it may require a client certificate "
                "(cert and key) signed by a CA it trusts")
    return ""


def _prediction(digit, probability, probabilities) -> Prediction:
    probabilities = tuple(float(p) for p in probabilities)
    if len(probabilities) != 10:
        raise ValueError(f"{len(probabilities)} probabilities, expected 10")
    return Prediction(int(digit), float(probability), probabilities)


def _classified(classes) -> Prediction:
    """A Prediction from one image's (label, score) pairs, labels "0".."9" in any order."""
    scores = {}
    for label, score in classes:
        scores[int(label)] = float(score)
    if sorted(scores) != list(range(10)):
        raise ValueError(f"classes {sorted(scores)}, expected 0..9")
    probabilities = tuple(scores[digit] for digit in range(10))
    digit = max(range(10), key=probabilities.__getitem__)  # the first of equal scores, as argmax picks
    return Prediction(digit, probabilities[digit], probabilities)


def _check_api(api: str) -> str:
    if api not in APIS:
        raise ValueError(f"unknown api {api!r}: expected one of {', '.join(APIS)}")
    return api


def _check_count(predictions: list[Prediction], images: Sequence[bytes]) -> None:
    if len(predictions) != len(images):
        raise ServingError("INTERNAL", f"{len(predictions)} answers for {len(images)} images")
