"""A --batching_parameters_file as the server reads it: every field read, every impossible value refused."""

from __future__ import annotations

import re

import pytest

from serving import configs
from serving.batching import BatchingOptions


def read(tmp_path, text: str) -> BatchingOptions:
    path = tmp_path / "batching.config"
    path.write_text(text)
    return BatchingOptions.from_proto(configs.read_text_proto(path, configs.BatchingParameters))


def test_every_field_of_a_valid_file_is_read(tmp_path):
    options = read(tmp_path, """
        max_batch_size { value: 16 }
        batch_timeout_micros { value: 5000 }
        num_batch_threads { value: 3 }
        max_enqueued_batches { value: 7 }
        allowed_batch_sizes: 4
        allowed_batch_sizes: 8
        allowed_batch_sizes: 16
    """)
    assert options == BatchingOptions(max_batch_size=16, batch_timeout_micros=5000, num_batch_threads=3,
                                      max_enqueued_batches=7, allowed_batch_sizes=(4, 8, 16))


def test_fields_a_file_leaves_out_keep_their_defaults(tmp_path):
    assert read(tmp_path, "num_batch_threads { value: 1 }") == BatchingOptions(num_batch_threads=1)
    assert read(tmp_path, "") == BatchingOptions()


@pytest.mark.parametrize("text, message", [
    ("max_batch_size { value: 8 } allowed_batch_sizes: [4, 2, 8]",
     r"allowed_batch_sizes must be positive and strictly increasing, not \[4, 2, 8\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 2, 8]",
     r"allowed_batch_sizes must be positive and strictly increasing, not \[2, 2, 8\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [0, 8]",
     r"allowed_batch_sizes must be positive and strictly increasing, not \[0, 8\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4]",
     r"the last of allowed_batch_sizes \[2, 4\] must equal max_batch_size \(8\)"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4, 16]",
     r"the last of allowed_batch_sizes \[2, 4, 16\] must equal max_batch_size \(8\)"),
    ("max_batch_size { value: 0 }", "max_batch_size must be at least 1, not 0"),
    ("num_batch_threads { value: 0 }", "num_batch_threads must be at least 1, not 0"),
    ("num_batch_threads { value: -2 }", "num_batch_threads must be at least 1, not -2"),
    ("max_enqueued_batches { value: 0 }", "max_enqueued_batches must be at least 1, not 0"),
    ("batch_timeout_micros { value: -1 }", "batch_timeout_micros must not be negative, not -1"),
], ids=["decreasing", "repeated", "zero size", "short of max", "beyond max", "max_batch_size 0",
        "no threads", "negative threads", "no queue", "negative timeout"])
def test_an_impossible_value_is_refused_naming_the_field_and_the_value(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read(tmp_path, text)


def test_every_problem_of_a_file_is_named_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        read(tmp_path, "max_batch_size { value: 0 } num_batch_threads { value: 0 }")
    assert "max_batch_size must be at least 1" in str(error.value)
    assert "num_batch_threads must be at least 1" in str(error.value)


def test_the_server_refuses_to_start_with_an_impossible_file(tmp_path, serve):
    """Before a model is loaded or a port bound: the operator sees the reason at once."""
    bad = tmp_path / "batching.config"
    bad.write_text("max_batch_size { value: 8 } allowed_batch_sizes: [8, 4]")
    with pytest.raises(ValueError, match=re.escape("allowed_batch_sizes must be positive and strictly increasing, "
                                                   "not [8, 4]")):
        serve(tmp_path / "no_versions_here", enable_batching=True, batching_parameters_file=str(bad))
