"""The memory soak (bench/soak.py) in smoke mode against the session's tiny model: it runs end to end, its
summary is well-formed, and the server answered every request with a digit or a 400, never a 5xx.

The memory figures are not asserted here (a few small rounds cannot show a plateau); docs/soak.md has the
real runs. The checks that judge answers and the plateau are tested on made-up answers, so they can fail.
"""

import json
from pathlib import Path

import grpc
import pytest

from bench import soak

KNOWN_OUTCOMES = {"digit", "invalid", "error"}


@pytest.fixture(scope="module")
def smoke(model_base_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    code = soak.main(["--model", str(model_base_path), "--smoke", "--out", str(out), "--label", "smoke"])
    return code, json.loads(out.read_text())


def test_smoke_soak_answers_every_request_with_a_digit_or_a_400(smoke):
    code, stored = smoke
    (run,) = stored["runs"]
    summary = run["summary"]
    assert run["label"] == "smoke" and run["settings"]["rounds"] == 3 and run["settings"]["concurrency"] == 2
    assert summary["errors"] == 0, [r.get("errors") for r in run["rounds"]]
    assert summary["server_errors"] == {}, run["server_counts"]
    assert summary["requests"] == 6 and summary["digits"] + summary["invalid"] == 6
    assert summary["answers_ok"] is True and code == 0
    # the server's own counters: every request answered OK or INVALID_ARGUMENT, none failed otherwise
    counted = run["server_counts"]
    assert counted and all(key.split("/")[1] in ("OK", "INVALID_ARGUMENT") for key in counted), counted
    assert sum(counted.values()) == summary["requests"] + 2  # and the two final checks
    assert {api: check["result"] for api, check in run["final_check"].items()} == {"rest": "digit", "grpc": "digit"}
    assert run["server_alive"] is True and run["server_died"] is False and run["server_exit_code"] == 0


def test_smoke_soak_summary_and_curve_are_well_formed(smoke):
    _, stored = smoke
    (run,) = stored["runs"]
    summary = run["summary"]
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    for record in run["rounds"]:
        assert set(record["answers"]) <= KNOWN_OUTCOMES and sum(record["answers"].values()) == 2
        # VmHWM and VmRSS of one read agree (the kernel reports the larger of its recorded peak and the RSS now),
        # but the peak is recorded when memory is unmapped, not when pages are given back by madvise, as
        # malloc_trim does (serving/memory.py): an RSS read before may exceed a later VmHWM.
        assert record["rss_mb"] > 100 and 100 < record["rss_after_pause_mb"] <= record["hwm_mb"], record
        assert record["anon_mb"] > 0 and record["threads"] > 1 and record["seconds"] > 0
    assert summary["rss_start_mb"] > 100 and summary["rss_max_mb"] >= summary["rss_plateau_mb"] > 100
    assert summary["hwm_mb"] > 100 and summary["rss_after_idle_mb"] > 100  # (VmHWM: see above)
    assert summary["plateau"] is None and summary["slope_last_half_mb_per_round"] is None  # 3 rounds: too few
    assert run["samples"] and all(rss > 100 for _, rss in run["samples"])
    assert {p["kind"] for p in run["payloads"]} == set(soak.KINDS)
    assert all(0 < p["bytes"] <= 300_000 and p["rest_body_bytes"] < soak.MAX_BODY_BYTES for p in run["payloads"])
    assert "| round |" in soak.table(run) and "| idle |" in soak.comparison(stored["runs"])


@pytest.mark.parametrize(("status", "body", "images", "expected"), [
    (200, {"predictions": [{"digit": 3, "probability": 0.9}, {"digit": 0}]}, 2, "digit"),
    (200, {"predictions": [{"digit": 3}]}, 2, "error"),  # an image without its digit
    (200, {"predictions": [{"digit": 12}]}, 1, "error"),
    (400, {"error": "no ink found: the image is blank"}, 1, "invalid"),
    (400, {}, 1, "error"),  # a 400 that does not say why
    (413, {"error": "too large"}, 1, "error"),  # the payloads are made to fit: a 413 is the harness's fault
    (500, {"error": "Internal server error"}, 1, "error"),
    (503, {"error": "The server is shutting down"}, 1, "error"),
])
def test_rest_answers_are_judged(status, body, images, expected):
    assert soak.rest_outcome(status, json.dumps(body).encode(), images)[0] == expected


def test_a_rest_answer_that_is_not_json_is_an_error():
    assert soak.rest_outcome(502, b"<html>Bad Gateway</html>", 1)[0] == "error"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"


@pytest.mark.parametrize(("code", "expected"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "invalid"), (grpc.StatusCode.INTERNAL, "error"),
    (grpc.StatusCode.UNKNOWN, "error"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "error"),
    (grpc.StatusCode.UNAVAILABLE, "error"), (grpc.StatusCode.DEADLINE_EXCEEDED, "error"),
])
def test_grpc_errors_are_judged(code, expected):
    assert soak.grpc_outcome(None, _RpcError(code), 1)[0] == expected


def test_a_grpc_answer_needs_a_digit_for_each_image():
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    response.outputs["digit"].CopyFrom(tf.make_tensor_proto(np.array([4, 7], np.int64)))
    assert soak.grpc_outcome(response, None, 2) == ("digit", "4,7")
    assert soak.grpc_outcome(response, None, 3)[0] == "error"
    assert soak.grpc_outcome(predict_pb2.PredictResponse(), None, 1)[0] == "error"


def _result(curve: list[float], **overrides) -> dict:
    result = {"rounds": [{"round": i + 1, "rss_after_pause_mb": mb, "answers": {"digit": 8}}
                         for i, mb in enumerate(curve)],
              "server_counts": {"grpc/OK": 4.0 * len(curve), "rest/OK": 4.0 * len(curve)},
              "final_check": {"rest": {"result": "digit"}, "grpc": {"result": "digit"}},
              "server_alive": True, "server_exit_code": 0, "samples": [[0.0, mb] for mb in curve],
              "rss_start": {"VmRSS": 700.0}, "rss_end": {"VmHWM": 2000.0}, "rss_after_idle": {"VmRSS": curve[-1]},
              "seconds": 60.0}
    result.update(overrides)
    return result


def test_the_plateau_test_fails_a_curve_that_keeps_rising():
    settings = soak.Settings(model=None)
    rising = soak.summarise(_result([1000 + 40 * i for i in range(12)]), settings)
    assert rising["plateau"] is False and rising["slope_last_half_mb_per_round"] == pytest.approx(40)
    flat = soak.summarise(_result([1000, 1300, 1450, 1480, 1470, 1490, 1475, 1480, 1485, 1470, 1480, 1478]),
                          settings)
    assert flat["plateau"] is True and flat["rss_plateau_mb"] == pytest.approx(1479)
    assert flat["answers_ok"] is True


def test_a_5xx_counted_by_the_server_or_a_dead_server_fails_the_answers():
    settings = soak.Settings(model=None)
    curve = [1000.0] * 6
    assert soak.summarise(_result(curve), settings)["answers_ok"] is True
    counts = {"grpc/OK": 20.0, "rest/INTERNAL": 1.0}
    assert soak.summarise(_result(curve, server_counts=counts), settings)["answers_ok"] is False
    assert soak.summarise(_result(curve, server_alive=False), settings)["answers_ok"] is False
    assert soak.summarise(_result(curve, server_exit_code=-9), settings)["answers_ok"] is False
    errors = _result(curve)
    errors["rounds"][2]["answers"] = {"digit": 7, "error": 1}
    assert soak.summarise(errors, settings)["errors"] == 1


def test_the_launcher_runs_the_server_only_for_mallopt_or_the_probe(tmp_path):
    """The fixes the launcher used to patch in are in serving/: a plain soak runs serving.server itself."""
    plain, env = soak.server_command(tmp_path, soak.Settings(model=tmp_path), tmp_path / "probe.json")
    assert plain[1:3] == ["-m", "serving.server"] and env == {}
    settings = soak.Settings(model=tmp_path, mallopt={"M_MMAP_THRESHOLD": 1 << 20}, probe=True)
    launched, env = soak.server_command(tmp_path, settings, tmp_path / "probe.json")
    assert launched[1:4] == ["-m", "bench.soak", "serve"] and launched[4:] == plain[3:]
    assert env == {soak.MALLOPT_ENV: "M_MMAP_THRESHOLD=1048576", soak.PROBE_FILE_ENV: str(tmp_path / "probe.json")}


@pytest.mark.parametrize("batching", [True, False], ids=["batching on", "batching off"])
def test_the_soak_starts_the_server_with_flags_it_accepts(tmp_path, batching):
    """The server refuses a batching file without --enable_batching, as tensorflow_model_server does."""
    from serving import server

    command, _ = soak.server_command(tmp_path, soak.Settings(model=tmp_path, batching=batching), tmp_path / "p.json")
    options = server.parse_args(command[3:])
    assert options.enable_batching is batching
    assert server.option_errors(options) == []


@pytest.mark.parametrize("flag", ["--grpc-no-abort", "--batcher-no-cycles", "--malloc-trim=1", "--trim-delay=1"])
def test_the_removed_launcher_fixes_are_refused(flag, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        soak.main(["--model", str(tmp_path), flag])
    assert exit_info.value.code == 2


def test_the_report_reads_runs_stored_before_and_after_the_launcher_fixes_were_removed(capsys, tmp_path):
    """docs/soak.json holds runs whose settings have malloc_trim_mb, trim_delay_s, grpc_no_abort and
    batcher_no_cycles (some without trim_delay_s or batcher_no_cycles), and runs made since, without them."""
    stored = json.loads(Path(soak.__file__).resolve().parents[1].joinpath("docs", "soak.json").read_text())["runs"]
    assert any("grpc_no_abort" in run["settings"] for run in stored)
    settings = soak.Settings(model=None)
    new = _result([1000.0 + i for i in range(6)])
    new.update(label="new", settings={"rounds": 6, "concurrency": 8, "batching": True, "payload_bytes": 12_000_000,
                                      "pause_s": 2.0, "idle_s": 30.0, "seed": 0, "mallopt": {}, "probe": False})
    for record in new["rounds"]:
        record.update(seconds=5.0, server_cpu_s=4.0, rss_mb=record["rss_after_pause_mb"] + 300, peak_rss_mb=1500.0,
                      hwm_mb=2000.0, anon_mb=600.0)
    new["summary"] = soak.summarise(new, settings)
    out = tmp_path / "soak.json"
    out.write_text(json.dumps({"runs": stored}))
    soak.store(out, new)
    runs = json.loads(out.read_text())["runs"]
    assert [run["label"] for run in runs] == [run["label"] for run in stored] + ["new"]
    assert soak.main(["--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"### {run['label']}\n" in printed for run in runs)
    assert printed.count("| idle | ") == 1 and printed.count(": right.") == len(runs)
