"""The serving benchmark harness in smoke mode: it runs end to end and its results are well-formed.

The figures themselves are not asserted (CI machines are shared and small); docs/benchmarks.md has them.
h2load and wrk are used when installed, else the harness falls back to its Python clients and says so.
"""

import json
import math
import os

import pytest

from bench import loadgen
from bench import serving as bench


@pytest.fixture(scope="module")
def results(model_base_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    assert bench.main(["--model", str(model_base_path), "--smoke", "--reference", str(model_base_path / "1"),
                       "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_in_process_figures(results):
    inproc = results[0]["in_process"]
    assert 0 < inproc["latency_p50_ms"] <= inproc["latency_p99_ms"]
    assert set(inproc["throughput"]) == {"1", "8"} and all(rate > 0 for rate in inproc["throughput"].values())
    assert 0 <= inproc["digit"] <= 9 and math.isclose(sum(inproc["probabilities"]), 1, abs_tol=1e-3)


def test_the_split_times_the_image_graph_the_network_and_both_at_each_batch(results):
    data, out = results
    split = data["graph_split"]
    assert set(split) == {"1", "8", "64"}
    for cells in split.values():
        assert set(cells) == {"image_graph", "network", "both"}
        for cell in cells.values():
            assert cell["images_per_s"] > 0
            assert cell["us_per_image"] == pytest.approx(1e6 / cell["images_per_s"])
    assert "| 64 |" in out.with_suffix(".table.md").read_text()


def test_server_cells_cover_both_apis_and_concurrencies_without_errors(results):
    data = results[0]
    cells = data["server"]
    assert {(c["api"], c["concurrency"]) for c in cells} >= {(api, c) for api in ("grpc", "rest") for c in (1, 2)}
    for cell in cells:
        assert cell["errors"] == 0, cell
        assert cell["requests"] > 0 and cell["rps"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"], cell
        assert cell["checked"] >= cell["requests"] > 0, cell  # every answer counted was checked
    expected = {"grpc": "h2load" if loadgen.available("h2load") else "python",
                "rest": "wrk" if loadgen.available("wrk") else "python"}
    assert all(c["generator"] == expected[c["api"]] for c in cells if c["concurrency"] == 1)
    assert data["answers_checked"] == ["grpc stub before load", "rest before load", "grpc stub after load",
                                       "rest after load"]


def test_memory_baseline_and_criteria_are_reported(results):
    data, out = results
    memory = data["memory"]
    assert memory["requests"] > 0 and memory["errors"] == 0 and memory["rss_max_mb"] > 0 and memory["samples"]
    assert data["baseline"]["requests"] > 0 and data["baseline"]["errors"] == 0
    assert data["generators"] and all(g["cpu_us_per_request"] > 0 for g in data["generators"].values())
    assert data["criteria"]["no_errors"] is True
    assert data["criteria"]["grpc_c32_at_least_70pct_of_batch64"] is None  # smoke mode has neither cell
    assert data["criteria"]["grpc_c32_at_least_85pct_of_batch64"] is None
    assert data["criteria"]["png_batch64_at_least_60pct_of_network_alone"] in (True, False)
    reference = data["reference"]  # the same export as its own reference
    assert reference["ours_p50_ms"] > 0 and reference["reference_p50_ms"] > 0
    assert reference["ratio"] == pytest.approx(reference["ours_p50_ms"] / reference["reference_p50_ms"])
    assert data["criteria"]["one_image_at_most_0.45x_of_the_reference_export"] == (reference["ratio"] <= 0.45)
    assert "One image in process, alternating" in out.with_suffix(".table.md").read_text()
    assert data["machine"]["cores"] >= 1
    table = out.with_suffix(".table.md").read_text()
    assert "| grpc |" in table and "| rest |" in table and "naive baseline" in table


def test_percentile():
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert math.isnan(loadgen.percentile([], 50))


def test_grpc_frame_is_length_prefixed():
    request = bench.predict_request(b"\x89PNG")
    frame = loadgen.grpc_frame(request)
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(frame) - 5 == request.ByteSize()


def test_training_benchmark_times_pipeline_epochs_and_step_against_a_baseline(data_dir, tmp_path):
    from bench import training as training_bench

    out = tmp_path / "training.json"
    tiny = ["--data-dir", data_dir, "--train-subset", "512", "--validation-size", "128", "--batch-size", "64",
            "--conv1-filters", "4", "--conv2-filters", "4", "--conv3-filters", "4", "--fc1-units", "16",
            "--fc2-units", "16", "--epochs", "2", "--steps", "4", "--verbose", "0"]
    results = training_bench.main([*tiny, "--baseline", "HEAD", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    for run in (results, results["baseline"]):
        assert run["pipeline"]["images"] == 4 * 64 and run["pipeline"]["images_per_s"] > 0
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert all(e["seconds"] >= e["training_seconds"] > 0 and e["cpu_seconds"] > 0 for e in run["epochs"])
        assert run["steady_epoch_seconds"] == run["epochs"][1]["seconds"]
        assert run["train_step"]["images_per_s"] > 0 and run["config"]["train_subset"] == 512
    assert len(results["baseline"]["commit"]) >= 7
    assert results["steady_epoch_speedup"] == round(results["baseline"]["steady_epoch_seconds"]
                                                    / results["steady_epoch_seconds"], 2)
    assert results["steady_epoch_cpu_speedup"] == round(results["baseline"]["steady_epoch_cpu_seconds"]
                                                        / results["steady_epoch_cpu_seconds"], 2)


def test_training_benchmark_passes_its_own_options_only_to_itself():
    from bench.training import without_options

    argv = ["--epochs", "3", "--baseline", "466d904", "--out=x.json", "--data-dir", "d", "--steps", "5"]
    assert without_options(argv, ("--baseline", "--out", "--data-dir")) == ["--epochs", "3", "--steps", "5"]


# ------------------------------------------------------------------------------------------- bench/fuzz.py

@pytest.fixture(scope="module")
def fuzz_results(model_base_path, data_dir, tmp_path_factory):
    """A short fuzzing run (batching on) against the session's tiny model: about 15 s with the server start."""
    from bench import fuzz

    out = tmp_path_factory.mktemp("fuzz") / "fuzz.json"
    code = fuzz.main(["--model", str(model_base_path), "--data-dir", data_dir, "--cases", "240",
                      "--batching", "on", "--no-large-images", "--concurrency", "2", "--seed", "0",
                      "--out", str(out)])
    results = json.loads(out.read_text())
    assert code == (0 if results["ok"] else 1)
    return results


def test_fuzzer_covers_every_family_and_checks_the_server_before_and_after(fuzz_results):
    phase, = fuzz_results["phases"]
    assert phase["batching"] is True and phase["cases"] >= 200
    for family in ("rest", "grpc", "image"):
        tally = phase["by_family"][family]
        assert tally["cases"] >= 40, family
        assert any(label.endswith(" OK") or label.startswith("HTTP 200") for label in tally["outcomes"]), tally
        assert any("400" in label or "INVALID_ARGUMENT" in label for label in tally["outcomes"]), tally
    assert all(d is not None and 0 <= d <= 9 for d in phase["control_digits"])
    assert not [g for g in phase["failures"] if g["family"] == "check"]  # the digits answered at start and end
    memory = phase["memory"]
    assert memory["rss_start_mb"] > 0 and memory["samples"]
    assert memory["rss_start_mb"] - 50 <= memory["rss_max_mb"] <= memory["peak_hwm_mb"] + 1  # VmHWM: the peak
    assert phase["server_exit_code"] is None and phase["server_stopped_with"] == 0


def test_fuzzer_finds_no_failure(fuzz_results):
    phase, = fuzz_results["phases"]
    assert phase["failures"] == [] and fuzz_results["ok"]


def test_fuzzer_reports_5xx_internal_and_missing_answers(mnist_test_arrays):
    """Against a broken server (REST 500 to everything, gRPC INTERNAL to every call) every family fails."""
    import threading
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import grpc

    from bench import fuzz

    class Broken(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def fail(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = fail

        def log_message(self, *args):
            pass

    class Internal(grpc.GenericRpcHandler):
        def service(self, details):
            def fail(request, context):
                context.abort(grpc.StatusCode.INTERNAL, "broken on purpose")
            return grpc.unary_unary_rpc_method_handler(fail)

    rest = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=rest.serve_forever, daemon=True).start()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    grpc_server.add_generic_rpc_handlers((Internal(),))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    target = fuzz.Target(rest.server_address[1], grpc_port, os.getpid())
    try:
        material = fuzz.Material.from_digits(mnist_test_arrays[0][:4], large=False)
        summary = fuzz.run_phase(target, material, fuzz.Settings(concurrency=2, timeout=10),
                                 fuzz.Budget(seconds=20, cases=90), progress=lambda message: None)
    finally:
        target.close()
        rest.shutdown()
        grpc_server.stop(0)
    failed = {(g["family"], g["failure"]) for g in summary["failures"]}
    assert ("rest", "HTTP 500") in failed and ("image", "HTTP 500") in failed
    assert ("grpc", "gRPC INTERNAL") in failed and ("image", "gRPC INTERNAL") in failed
    assert {g["kind"] for g in summary["failures"] if g["family"] == "check"} == {"start", "end"}
    assert summary["failure_count"] >= 30
    example = next(g for g in summary["failures"] if g["failure"] == "HTTP 500")["examples"][0]["input"]
    assert example["bytes"] > 0 and example["head"].startswith("b'")  # a reproducer: the input's first bytes


def test_fuzzer_classifies_answers():
    from bench import fuzz

    assert [fuzz.http_failure(s) for s in (200, 400, 404, 413, 431, 501, 505)] == [None] * 7
    assert [fuzz.http_failure(s) for s in (500, 502, 503, 504)] == ["HTTP 500", "HTTP 502", "HTTP 503", "HTTP 504"]
    assert [fuzz.grpc_failure(c) for c in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                                           "UNIMPLEMENTED", "FAILED_PRECONDITION")] == [None] * 6
    assert all(fuzz.grpc_failure(c) for c in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"))
    # Two answers on one connection (the second the valid request sent after a kept-alive one), then garbage.
    raw = (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
           b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}garbage")
    answers, unreadable = fuzz.parse_answers(raw)
    assert [a.status for a in answers] == [404, 200] and unreadable


def test_image_mutations_are_reproducible_and_small(mnist_test_arrays):
    import random

    from bench import fuzz

    material = fuzz.Material.from_digits(mnist_test_arrays[0][:2], large=False)
    first = [fuzz.mutate_image(random.Random(7), material) for _ in range(3)]
    again = [fuzz.mutate_image(random.Random(7), material) for _ in range(3)]
    assert first == again
    made = [fuzz.mutate_image(random.Random(seed), material) for seed in range(300)]
    assert len({data for data, _ in made}) > 250 and max(len(data) for data, _ in made) < 2**20
    assert any(note.startswith("png") and "png " in note for _, note in made)  # chunk and IHDR changes happen
