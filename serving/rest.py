"""TF Serving's REST API (g3doc/api_rest.md) on the standard library's threaded HTTP server.

Routes: GET /v1/models/{name}[/versions/{v}|/labels/{l}][/metadata], POST ...:predict and ...:classify
(serving/classify.py), and the Prometheus endpoint when monitoring enables it. Errors are {"error": "..."} with
400 for bad input, 404 for unknown models, versions and paths, 405 for a wrong method, 411/413 for a missing or
too large body, 501 for :regress. With the access log on (serving/access_log.py), each request to a model's
path writes its line (the page, the metrics and paths that name no model do not).
"""

import json
import logging
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from serving import classify
from serving.access_log import CLIENT_CLOSED_REQUEST, note, peer
from serving.errors import ServingError
from serving.models import Servable
from serving.predict import Predictor
from serving.static import StaticFiles
from serving.status import SIGNATURE_DEF_FIELD, model_metadata, model_status
from serving.tensors import inputs_from_json, outputs_to_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
_MODEL_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?")


class RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog: the default 5 stalls bursts of new connections for 1 s

    def __init__(self, address: tuple[str, int], predictor: Predictor, metrics_path: str | None,
                 timeout_seconds: float, static_dir: str = "") -> None:
        self.predictor = predictor
        self.static = StaticFiles(static_dir) if static_dir else None  # the drawing page, web/
        self.metrics_path = metrics_path
        self.timeout_seconds = timeout_seconds
        self.draining = False
        self._inflight = 0
        self._idle = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._late: set[socket.socket] = set()  # taken from the backlog at stop: their request is served
        super().__init__(address, RestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else every answer waits ~40 ms (Nagle)
        with self._idle:
            self._connections.add(conn)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or stalls is routine for a server: one debug line, not a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._idle:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Ends the kept-alive connections still open (idle once the drain is over): their handler threads
        see end of file instead of serving a request after the server stopped."""
        with self._idle:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def answer_backlog(self) -> None:
        """Takes the connections the kernel accepted that serve_forever did not (it has stopped): closing the
        listening socket would reset them. Each one's first request is served as usual, on its own thread,
        and answered with `Connection: close`; wait_idle counts them."""
        self.socket.setblocking(False)
        while True:
            try:
                conn, addr = self.get_request()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            with self._idle:
                self._late.add(conn)
            self.track(1)
            threading.Thread(target=self._answer_late, args=(conn, addr), name="rest-late", daemon=True).start()

    def _answer_late(self, conn: socket.socket, addr: Any) -> None:
        try:
            self.process_request_thread(conn, addr)  # ThreadingMixIn: serve, handle errors, close
        finally:
            with self._idle:
                self._late.discard(conn)
            self.track(-1)

    def accepted_before_stop(self, conn: socket.socket) -> bool:
        with self._idle:
            return conn in self._late

    def track(self, delta: int) -> None:
        with self._idle:
            self._inflight += delta
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


class RestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so an answer to a request line we cannot read still has a status line
    server_version = "EmbeddedTFServing"
    server: RestServer

    def parse_request(self) -> bool:
        """The standard library's, less HTTP/0.9: a request line without a version ("GET /path") would have
        its headers read until the client sends a blank line or the read times out, holding a thread."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(requestline.split()) == 2:
            self.command, self.requestline, self.request_version = None, requestline, self.default_request_version
            self.send_error(400, "HTTP/0.9 requests are not supported: send HTTP/1.0 or HTTP/1.1")
            return False
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the standard library finds (a request line it cannot read, an HTTP version it does not
        speak, headers too long) in this server's JSON, like every other answer, instead of an HTML page."""
        self.close_connection = True
        self._send_error(code, message or HTTPStatus(code).phrase)

    def setup(self) -> None:
        self.timeout = self.server.timeout_seconds  # bounds a slow or stalled client, per socket read
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.sent_status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection or self.server.draining or self._body_unread():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _body_unread(self) -> bool:
        """A body the request declared and the answer did not need (a GET with a body, a POST refused before its
        body was read) is still on the connection: read as the next request, it would be answered as one
        (request smuggling behind a keep-alive proxy). Such a connection is closed after the answer."""
        if self.body_read or not hasattr(self, "headers"):
            return False
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() != "0"

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, indent=None).encode())

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _content_length(self) -> int | None:
        """Checks the declared body size before anything is read; sends the error and returns None if bad."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send_error(411, "Chunked request bodies are not supported: send a Content-Length")
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send_error(411, "A valid Content-Length header is required")
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread, so this connection cannot be reused
            self._send_error(413, f"Request body of {length} bytes is larger than the limit of {MAX_BODY_BYTES}")
            return None
        return length

    def handle_expect_100(self) -> bool:
        if self.command == "POST" and self._content_length() is None:
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        self.body_read = False
        self.sent_status: int | None = None
        self.call = None  # the access-log record, once the path names a model (see _route)
        self.server.track(1)
        try:
            if self.server.draining and not self.server.accepted_before_stop(self.request):
                # a request on a kept-alive connection while stopping
                self.close_connection = True
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down")
            self._route()
        except ServingError as e:
            self._send_error(e.http_status, e.message)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug of ours: say so, keep the server up
            log.exception("Unhandled error for %s %s", self.command, self.path)
            self.close_connection = True
            self._send_error(500, "Internal server error")
        finally:
            self.server.predictor.access_log.end(self.call, self.sent_status or CLIENT_CLOSED_REQUEST)
            self.server.track(-1)

    do_GET = do_POST = _dispatch

    def _unsupported(self) -> None:
        self.close_connection = True
        self._send_error(405, f"Method {self.command} not allowed")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _unsupported

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.metrics_path and path == self.server.metrics_path:
            self._require("GET")
            body = self.server.predictor.metrics.render().encode()
            return self._send(200, body, "text/plain; version=0.0.4")
        if self.server.static and self.command == "GET" and not path.startswith("/v1/"):
            page = self.server.static.lookup(path)
            if page:
                return self._send(200, page.body, page.content_type)
        match = _MODEL_PATH.fullmatch(path)
        if not match:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {self.command} {path}")
        name, label, verb = match["name"], match["label"], match["verb"]
        method = verb.capitalize() if verb else "GetModelMetadata" if match["metadata"] else "GetModelStatus"
        self.call = self.server.predictor.access_log.begin("rest", method, peer(self.client_address), name)
        version = None
        if match["version"] is not None:
            text = match["version"]
            if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) < 2**63):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Version must be an integer (int64): {text}")
            version = int(text)
        if verb:
            self._require("POST")
            if verb == "regress":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   "regress is not supported: the model has no regression signature (use predict or "
                                   "classify)")
            return self._predict(name, version, label, verb)
        self._require("GET")
        if match["metadata"]:
            return self._metadata(name, version, label)
        response = model_status(self.server.predictor.manager, name, version, label)
        self._send_json(200, json_format.MessageToDict(response, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True))

    def _require(self, method: str) -> None:
        if self.command != method:
            self.close_connection = True
            raise _MethodNotAllowed(method)

    def _metadata(self, name: str, version: int | None, label: str | None) -> None:
        served, signatures = model_metadata(self.server.predictor.manager, name, version, label)
        note(version=served)
        signature_defs = json_format.MessageToDict(signatures, preserving_proto_field_name=True)
        self._send_json(200, {"model_spec": {"name": name, "signature_name": "", "version": str(served)},
                              "metadata": {SIGNATURE_DEF_FIELD: signature_defs}})

    def _predict(self, name: str, version: int | None, label: str | None, verb: str) -> None:
        length = self._content_length()
        if length is None:
            return
        raw = self.rfile.read(length)
        self.body_read = True
        if len(raw) < length:
            raise ConnectionError("client closed before sending the whole body")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "JSON Parse error: nested too deeply") from None
        except ValueError as e:  # also malformed UTF-8 and integers longer than Python reads (4,300 digits)
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"JSON Parse error: {e}") from None
        if verb == "classify":
            return self._classify(name, version, label, body)
        signature_name = body.get("signature_name", "") if isinstance(body, dict) else ""
        if not isinstance(signature_name, str):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "\"signature_name\" must be a string")
        row_format = "instances" in body if isinstance(body, dict) else True

        def get_inputs(servable: Servable, signature_name: str) -> dict[str, np.ndarray]:
            return inputs_from_json(body, servable.input_specs(signature_name))[0]

        result = self.server.predictor.predict(name, version, label, signature_name, get_inputs, api="rest")
        self._send_json(200, outputs_to_json(result.outputs, row_format))

    def _classify(self, name: str, version: int | None, label: str | None, body: Any) -> None:
        signature_name, request_input = classify.input_from_json(body)
        result = self.server.predictor.predict(
            name, version, label, signature_name,
            lambda servable, signature: classify.classification_inputs(servable, signature, request_input),
            api="rest", method=classify.CLASSIFY)
        answer = classify.classification_result(result.outputs, classify.example_count(request_input))
        self._send_json(200, classify.result_to_json(answer))


class _MethodNotAllowed(ServingError):
    def __init__(self, allowed: str) -> None:
        super().__init__(grpc.StatusCode.UNIMPLEMENTED, f"Method not allowed: use {allowed}")

    @property
    def http_status(self) -> int:
        return 405
