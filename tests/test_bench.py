"""The serving benchmark harness in smoke mode: it runs end to end and its results are well-formed.

The figures themselves are not asserted (CI machines are shared and small); docs/benchmarks.md has them.
h2load and wrk are used when installed, else the harness falls back to its Python clients and says so.
"""

import json
import math

import pytest

from bench import loadgen
from bench import serving as bench


@pytest.fixture(scope="module")
def results(model_base_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    assert bench.main(["--model", str(model_base_path), "--smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_in_process_figures(results):
    inproc = results[0]["in_process"]
    assert 0 < inproc["latency_p50_ms"] <= inproc["latency_p99_ms"]
    assert set(inproc["throughput"]) == {"1", "8"} and all(rate > 0 for rate in inproc["throughput"].values())
    assert 0 <= inproc["digit"] <= 9 and math.isclose(sum(inproc["probabilities"]), 1, abs_tol=1e-3)


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
