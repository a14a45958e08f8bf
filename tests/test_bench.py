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
