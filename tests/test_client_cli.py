"""client/predict.py, the CLI, against the real embedded server with PNG files of real MNIST digits.

Most cases call main(argv) in-process; a few run the script the ways a user does, in a subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client import predict
from client.mnist_client import RestClient

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<file>.+): (?P<digit>\d) \(probability (?P<probability>[01]\.\d{4})\)$")
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.fixture(scope="module")
def rest(server) -> str:
    return f"127.0.0.1:{server.rest_port}"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, mnist_png_bytes) -> Path:
    """Twelve real MNIST test digits as PNG files, and a text file that the directory listing must skip."""
    directory = tmp_path_factory.mktemp("digits")
    for i, (png, label) in enumerate(mnist_png_bytes[:12]):
        (directory / f"{i:02d}_label{label}.png").write_bytes(png)
    (directory / "README.txt").write_text("not an image")
    return directory


@pytest.fixture(scope="module")
def expected(server, digits_dir) -> dict[str, int]:
    """What the model answers for each file, asked directly through the library."""
    files = sorted(digits_dir.glob("*.png"))
    with RestClient(f"127.0.0.1:{server.rest_port}") as c:
        return {str(f): p.digit for f, p in zip(files, c.predict([f.read_bytes() for f in files]))}


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_lines(stdout: str) -> dict[str, int]:
    matches = [LINE.match(line) for line in stdout.splitlines()]
    assert all(matches), stdout
    return {m["file"]: int(m["digit"]) for m in matches}


def test_script_prints_one_line_per_image_without_loading_tensorflow(rest, digits_dir, expected):
    files = sorted(digits_dir.glob("*.png"))
    # As a user runs it: sys.path[0] is client/, not the repository. -X importtime lists every import.
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "client/predict.py", "--server", rest, str(files[0]), str(digits_dir)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)

    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [LINE.match(line)["file"] for line in lines] == [str(files[0])] + [str(f) for f in files]
    assert parse_lines(run.stdout) == expected
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "json" in imported and "tensorflow" not in imported and "grpc" not in imported


def test_module_run_over_grpc_with_json(server, digits_dir, expected):
    run = subprocess.run(
        [sys.executable, "-m", "client.predict", "--protocol", "grpc", "--server", f"127.0.0.1:{server.grpc_port}",
         "--json", str(digits_dir)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ""  # TensorFlow's start-up chatter stays hidden
    document = json.loads(run.stdout)
    assert document["protocol"] == "grpc" and document["model"] == "mnist"
    assert {r["file"]: r["digit"] for r in document["results"]} == expected


def test_json_document(rest, digits_dir, expected, capsys):
    assert predict.main(["--server", rest, "--json", str(digits_dir)]) == predict.EXIT_OK
    document = json.loads(capsys.readouterr().out)

    results = document["results"]
    assert [r["file"] for r in results] == sorted(expected)
    for r in results:
        assert r["digit"] == expected[r["file"]]
        assert len(r["probabilities"]) == 10
        assert r["probability"] == pytest.approx(max(r["probabilities"]))


def test_answers_do_not_depend_on_the_batch_size(rest, digits_dir, expected, capsys):
    for batch_size in ("1", "5", "64"):
        assert predict.main(["--server", rest, "--batch-size", batch_size, str(digits_dir)]) == predict.EXIT_OK
        assert parse_lines(capsys.readouterr().out) == expected


def test_grpc_in_process_matches_rest(server, rest, digits_dir, capsys):
    assert predict.main(["--server", rest, str(digits_dir)]) == 0
    by_rest = capsys.readouterr().out
    assert predict.main(["--protocol", "grpc", "--server", f"127.0.0.1:{server.grpc_port}", str(digits_dir)]) == 0
    assert capsys.readouterr().out == by_rest


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_the_classify_api_prints_what_predict_prints(server, digits_dir, protocol, capsys):
    port = server.rest_port if protocol == "rest" else server.grpc_port
    argv = ["--protocol", protocol, "--server", f"127.0.0.1:{port}", "--json", str(digits_dir)]
    assert predict.main(argv) == predict.EXIT_OK
    by_predict = json.loads(capsys.readouterr().out)
    assert predict.main([*argv, "--api", "classify"]) == predict.EXIT_OK
    by_classify = json.loads(capsys.readouterr().out)

    assert by_classify["api"] == "classify" and by_predict["api"] == "predict"
    for a, b in zip(by_predict["results"], by_classify["results"], strict=True):
        assert a["file"] == b["file"] and a["digit"] == b["digit"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_bad_files_are_named_and_the_others_still_answered(rest, digits_dir, expected, tmp_path, capsys):
    good = sorted(digits_dir.glob("*.png"))[:3]
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(CORRUPT_PNG)
    missing = tmp_path / "missing.png"
    argv = ["--server", rest, str(good[0]), str(text), str(good[1]), str(corrupt), str(missing), str(good[2])]

    assert predict.main(argv) == predict.EXIT_IMAGE_FAILED
    out, err = capsys.readouterr()

    assert parse_lines(out) == {str(f): expected[str(f)] for f in good}
    errors = err.splitlines()
    assert errors[0] == f"{text}: error: not an image (PNG, JPEG, GIF, BMP or WebP expected)"
    # The server's own message for the corrupt PNG, which came in the same request as the good images.
    assert errors[1].startswith(f"{corrupt}: error: rejected by the server: INVALID_ARGUMENT: ")
    assert "PNG" in errors[1]
    assert errors[2] == f"{missing}: error: cannot read: No such file or directory"
    assert len(errors) == 3


def test_bad_files_in_json(rest, digits_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(CORRUPT_PNG)
    good = min(digits_dir.glob("*.png"))
    assert predict.main(["--server", rest, "--json", "--protocol", "rest", str(corrupt), str(good)]) == 1
    out, err = capsys.readouterr()
    first, second = json.loads(out)["results"]
    assert first["file"] == str(corrupt) and "INVALID_ARGUMENT" in first["error"] and "digit" not in first
    assert second["file"] == str(good) and "error" not in second
    assert str(corrupt) in err


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unreachable_server(protocol, digits_dir, closed_port, capsys):
    argv = ["--protocol", protocol, "--server", f"127.0.0.1:{closed_port}", "--timeout", "5", str(digits_dir)]
    assert predict.main(argv) == predict.EXIT_UNREACHABLE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {protocol} server 127.0.0.1:{closed_port}: UNAVAILABLE: cannot reach")


def test_server_that_does_not_answer_times_out(digits_dir, capsys):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        assert predict.main(["--server", f"127.0.0.1:{port}", "--timeout", "0.3", str(digits_dir)]) == 3
    assert "DEADLINE_EXCEEDED: no answer from 127.0.0.1" in capsys.readouterr().err


def test_unknown_model_stops_with_the_servers_message(rest, digits_dir, capsys):
    assert predict.main(["--server", rest, "--model", "nope", str(digits_dir)]) == predict.EXIT_SERVER_ERROR
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "NOT_FOUND" in err and "nope" in err


def test_directory_without_images_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to see")
    assert predict.main([str(tmp_path)]) == predict.EXIT_USAGE
    assert "no image files" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--batch-size", "0", "x.png"], ["--timeout", "-1", "x.png"],
                                  ["--protocol", "http", "x.png"], ["--api", "regress", "x.png"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        predict.main(argv)
    assert caught.value.code == predict.EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_bad_server_address_exits_2(digits_dir, capsys):
    assert predict.main(["--server", "localhost:http", str(digits_dir)]) == predict.EXIT_USAGE
    assert "host:port" in capsys.readouterr().err


def test_default_server_follows_the_protocol():
    assert predict.parse_args(["x.png"]).server == "localhost:8501"
    assert predict.parse_args(["--protocol", "grpc", "x.png"]).server == "localhost:8500"


@pytest.mark.parametrize("head, is_image", [
    (b"\x89PNG\r\n\x1a\n....", True), (b"\xff\xd8\xff\xe0..JFIF", True), (b"GIF89a..", True),
    (b"GIF87a..", True), (b"BM\x36\x00", True), (b"%PDF-1.4", False), (b"", False), (b"\x89PNX", False),
])
def test_looks_like_image(head, is_image):
    assert predict.looks_like_image(head) is is_image


def test_wait_holds_the_predictions_until_a_version_is_available(tmp_path, model_base_path, digits_dir, serve,
                                                                  capsys, monkeypatch):
    base = tmp_path / "mnist"
    base.mkdir()
    server = serve(base, file_system_poll_wait_seconds=0.2)
    address = f"127.0.0.1:{server.rest_port}"
    assert predict.main(["--server", address, "--wait", "0.5", str(digits_dir)]) == predict.EXIT_UNREACHABLE
    assert "AVAILABLE" in capsys.readouterr().err

    # The version is published once the waiting client has been told there is none yet, so it must go on
    # waiting: the real status call, watched.
    told_none = threading.Event()
    model_status = RestClient.model_status

    def watched_model_status(self):
        try:
            return model_status(self)
        finally:
            told_none.set()

    monkeypatch.setattr(RestClient, "model_status", watched_model_status)

    def publish():
        told_none.wait(60)
        shutil.copytree(model_base_path / "1", base / ".tmp-1")
        (base / ".tmp-1").rename(base / "1")

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert predict.main(["--server", address, "--wait", "60", str(digits_dir)]) == predict.EXIT_OK
    finally:
        told_none.set()
        publisher.join()
    assert len([line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]) == 12
