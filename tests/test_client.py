"""client.mnist_client against the real embedded server, over real HTTP and gRPC, with a real trained model."""

from __future__ import annotations

import queue
import socket
import sys
import threading
from pathlib import Path

import pytest

from client.mnist_client import (
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_BYTES,
    GrpcClient,
    ModelVersionStatus,
    RestClient,
    ServingError,
    split_host_port,
)

ROOT = Path(__file__).resolve().parents[1]
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(scope="module")
def server(serve_module):
    """The embedded server with docker-compose's batching config, on free ports of 127.0.0.1."""
    return serve_module(enable_batching=True, batching_parameters_file=str(ROOT / "serving" / "batching.config"))


@pytest.fixture(params=["rest", "grpc"])
def client(request, server):
    if request.param == "rest":
        c = RestClient(f"127.0.0.1:{server.rest_port}", timeout=30)
    else:
        c = GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=30)
    with c:
        yield c


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel completes the handshake) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def make_client(protocol: str, port: int, **kwargs) -> RestClient | GrpcClient:
    return (RestClient if protocol == "rest" else GrpcClient)(f"127.0.0.1:{port}", **kwargs)


def test_reads_real_digits(client, mnist_png_bytes):
    images, labels = zip(*mnist_png_bytes)
    predictions = client.predict(list(images))

    assert len(predictions) == len(images)
    correct = sum(p.digit == label for p, label in zip(predictions, labels))
    assert correct >= 0.8 * len(labels), [(p.digit, label) for p, label in zip(predictions, labels)]
    for p in predictions:
        assert isinstance(p.digit, int) and 0 <= p.digit <= 9
        assert len(p.probabilities) == 10
        assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert p.probability == pytest.approx(max(p.probabilities))
        assert p.probabilities[p.digit] == pytest.approx(p.probability)


def test_rest_and_grpc_give_identical_answers(server, mnist_png_bytes):
    images = [png for png, _ in mnist_png_bytes]
    with RestClient(f"127.0.0.1:{server.rest_port}") as rest, GrpcClient(f"127.0.0.1:{server.grpc_port}") as grpc:
        by_rest, by_grpc = rest.predict(images), grpc.predict(images)
        one_by_one = [rest.predict([image])[0] for image in images[:5]]

    assert [p.digit for p in by_rest] == [p.digit for p in by_grpc]
    for a, b in zip(by_rest, by_grpc):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    # Batching must not change an image's answer.
    for a, b in zip(one_by_one, by_rest):
        assert a.digit == b.digit and a.probability == pytest.approx(b.probability, abs=1e-5)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_the_classify_api_answers_what_predict_answers_with_batching_on(server, protocol, mnist_png_bytes):
    images = [png for png, _ in mnist_png_bytes]
    port = server.rest_port if protocol == "rest" else server.grpc_port
    with make_client(protocol, port) as predictor, make_client(protocol, port, api="classify") as classifier:
        predicted, classified = predictor.predict(images), classifier.predict(images)

    assert classifier.signature == "classification" and predictor.signature == "serving_default"
    assert [p.digit for p in classified] == [p.digit for p in predicted]
    for a, b in zip(classified, predicted, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        assert a.probability == pytest.approx(b.probability, abs=1e-6)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_classify_against_a_signature_that_cannot_classify_is_the_servers_refusal(server, protocol,
                                                                                 mnist_png_bytes):
    port = server.rest_port if protocol == "rest" else server.grpc_port
    with make_client(protocol, port, api="classify", signature="serving_default") as c, \
            pytest.raises(ServingError) as caught:
        c.predict([mnist_png_bytes[0][0]])
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "output Tensors" in caught.value.message


def test_an_unknown_api_is_refused_before_any_call():
    with pytest.raises(ValueError, match="regress"):
        RestClient("localhost:1", api="regress")


def test_model_status_reports_available_version(client):
    assert client.model_status() == [ModelVersionStatus(version=1, state="AVAILABLE", error_message="")]


def test_corrupt_png_is_rejected_with_the_servers_message(client, mnist_png_bytes):
    with pytest.raises(ServingError) as caught:
        client.predict([mnist_png_bytes[0][0], CORRUPT_PNG])

    error = caught.value
    assert error.code == "INVALID_ARGUMENT"
    assert error.http_status == (400 if isinstance(client, RestClient) else None)
    assert "png" in error.message.lower(), error.message
    assert not error.no_answer
    # The connection or channel stays usable after a rejection.
    assert client.predict([mnist_png_bytes[0][0]])[0].digit in range(10)


def test_rest_and_grpc_report_the_same_rejection(server):
    with RestClient(f"127.0.0.1:{server.rest_port}") as rest, GrpcClient(f"127.0.0.1:{server.grpc_port}") as grpc:
        errors = []
        for c in (rest, grpc):
            with pytest.raises(ServingError) as caught:
                c.predict([CORRUPT_PNG])
            errors.append(caught.value)
    assert errors[0].code == errors[1].code == "INVALID_ARGUMENT"
    assert errors[0].message == errors[1].message


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unknown_model_is_not_found(server, protocol, mnist_png_bytes):
    port = server.rest_port if protocol == "rest" else server.grpc_port
    with make_client(protocol, port, model="nope") as c, pytest.raises(ServingError) as caught:
        c.predict([mnist_png_bytes[0][0]])
    assert caught.value.code == "NOT_FOUND"
    assert "nope" in caught.value.message
    assert caught.value.http_status == (404 if protocol == "rest" else None)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unknown_signature_is_rejected(server, protocol, mnist_png_bytes):
    port = server.rest_port if protocol == "rest" else server.grpc_port
    with make_client(protocol, port, signature="nope") as c, pytest.raises(ServingError) as caught:
        c.predict([mnist_png_bytes[0][0]])
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "nope" in caught.value.message


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unreachable_server(protocol, closed_port):
    with make_client(protocol, closed_port, timeout=5) as c, pytest.raises(ServingError) as caught:
        c.predict([CORRUPT_PNG])
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.no_answer
    assert f"127.0.0.1:{closed_port}" in caught.value.message


def test_the_rest_client_pointed_at_the_grpc_port_says_so(server):
    with RestClient(f"127.0.0.1:{server.grpc_port}", timeout=10) as c, pytest.raises(ServingError) as caught:
        c.model_status()
    assert caught.value.code == "INTERNAL" and not caught.value.no_answer  # retrying there cannot help
    assert "answers HTTP/2, as a gRPC port does" in caught.value.message and "--protocol grpc" in caught.value.message


def error_within(call, seconds: float) -> BaseException | None:
    """What the call raised (None if it returned), waited for at most `seconds` on another thread: a bound
    on a call that may never end, not a speed measurement."""
    outcome: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            call()
        except BaseException as e:  # handed to the test, which says what it expected
            outcome.put(e)
        else:
            outcome.put(None)

    threading.Thread(target=run, daemon=True).start()
    try:
        return outcome.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"the call had not ended after {seconds} s")


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_every_call_has_a_deadline(protocol, silent_port):
    """A server that accepts but never answers: every call gives up at the timeout the client was given. A
    client that used its default (DEFAULT_TIMEOUT) instead, or no deadline, is still waiting at half of it."""
    with make_client(protocol, silent_port, timeout=0.5) as c:
        for call in (lambda: c.predict([CORRUPT_PNG]), c.model_status):
            error = error_within(call, DEFAULT_TIMEOUT / 2)
            assert isinstance(error, ServingError), error
            assert error.code == "DEADLINE_EXCEEDED" and error.no_answer
            assert "within 0.5 s" in error.message, error.message


def test_rest_keeps_one_connection_alive(server, mnist_png_bytes):
    with RestClient(f"127.0.0.1:{server.rest_port}") as c:
        c.predict([mnist_png_bytes[0][0]])
        local_address = c._conn.sock.getsockname()
        c.model_status()
        c.predict([mnist_png_bytes[1][0]])
        assert c._conn.sock.getsockname() == local_address
    assert c._conn is None


def test_grpc_accepts_messages_beyond_grpcs_default_4_mb(server):
    # 6 MB of not-an-image: the server must get to see it and reject it as an image.
    with GrpcClient(f"127.0.0.1:{server.grpc_port}") as c, pytest.raises(ServingError) as caught:
        c.predict([b"\x89PNG\r\n\x1a\n" + b"\x00" * (6 << 20)])
    assert caught.value.code == "INVALID_ARGUMENT"


def test_requests_over_16_mb_are_refused_as_too_large(client, mnist_png_bytes):
    with pytest.raises(ServingError) as caught:
        client.predict([b"\x89PNG\r\n\x1a\n" + b"\x00" * MAX_MESSAGE_BYTES])
    assert caught.value.code == "RESOURCE_EXHAUSTED", caught.value
    assert caught.value.http_status == (413 if isinstance(client, RestClient) else None)
    assert client.predict([mnist_png_bytes[0][0]])[0].digit in range(10)


def test_no_images_make_no_request(closed_port):
    with RestClient(f"127.0.0.1:{closed_port}") as c:
        assert c.predict([]) == []


def test_rest_client_needs_no_tensorflow():
    import subprocess

    code = ("import sys; from client.mnist_client import RestClient; RestClient('localhost:1'); "
            "sys.exit('tensorflow' in sys.modules or 'grpc' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


@pytest.mark.parametrize("text, expected", [
    ("localhost:8501", ("localhost", 8501)),
    ("10.0.0.7", ("10.0.0.7", 9)),
    (":8500", ("localhost", 8500)),
    ("[::1]:8500", ("::1", 8500)),
    ("[::1]", ("::1", 9)),
])
def test_split_host_port(text, expected):
    assert split_host_port(text, 9) == expected


@pytest.mark.parametrize("text", ["host:port", "host:0", "host:70000"])
def test_split_host_port_rejects_bad_ports(text):
    with pytest.raises(ValueError, match="host:port"):
        split_host_port(text, 9)
