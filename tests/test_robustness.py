"""The robustness report on the session's tiny model and 40 test digits: structure, outputs, corruptions."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from training import evaluate, robustness, samples
from training.config import Config

N = 40


@pytest.fixture(scope="module")
def report(model_base_path, data_dir, tmp_path_factory):
    reports = tmp_path_factory.mktemp("robustness")
    evaluate.main(["--model", str(model_base_path), "--data-dir", data_dir, "--reports-dir", str(reports),
                   "--robustness", "--test-subset", str(N)])
    return reports, json.loads((reports / "robustness.json").read_text())


@pytest.fixture(scope="module")
def signature(model_base_path):
    loaded = tf.saved_model.load(str(model_base_path / "1"))
    yield loaded.signatures["serving_default"]


def test_report_lists_every_variant_and_writes_json_and_pngs(report, model_base_path):
    reports, result = report
    names = [v["name"] for v in result["variants"]]
    assert names == [v.name for v in robustness.variants()] and names[0] == "clean"
    assert set(robustness.CORRUPTIONS) <= set(names) and set(robustness.RENDERINGS) <= set(names)
    assert result["examples"] == N and result["model"] == str(model_base_path / "1")
    for v in result["variants"]:
        assert 0.0 <= v["accuracy"] <= 1.0 and v["errors"] == round((1 - v["accuracy"]) * N)
        assert v["delta"] == pytest.approx(v["accuracy"] - result["variants"][0]["accuracy"])
    summary = result["summary"]
    corruptions = [v["accuracy"] for v in result["variants"] if v["group"] == "corruption"]
    assert summary["corruption_mean_accuracy"] == pytest.approx(np.mean(corruptions))
    assert all(isinstance(ok, bool) for ok in summary["criteria"].values())
    mnist_c = {v["name"]: v for v in result["variants"] if v["group"] == "mnist_c"}
    assert [name.removeprefix("mnist_c_") for name in mnist_c] == list(robustness.mnist_c.CORRUPTIONS)
    unseen = [v["accuracy"] for v in mnist_c.values() if v["seen_in_training"] is None]
    seen = robustness.seen_in_training(robustness.training_config(model_base_path / "1"))
    assert result["mnist_c_seen_in_training"] == seen
    assert {name for name, v in mnist_c.items() if v["seen_in_training"]} == {f"mnist_c_{name}" for name in seen}
    assert len(unseen) == len(mnist_c) - len(seen)
    assert summary["mnist_c_unseen_mean_accuracy"] == pytest.approx(np.mean(unseen))
    assert summary["mnist_c_mean_accuracy"] == pytest.approx(np.mean([v["accuracy"] for v in mnist_c.values()]))
    for png in ("robustness.png", "robustness_examples.png", "mnist_c.png", "mnist_c_contact_sheet.png"):
        assert (reports / png).read_bytes().startswith(b"\x89PNG")
    table = robustness.format_table(result)
    assert all(name in table for name in names)


def test_clean_accuracy_equals_a_direct_evaluation(report, model_base_path, mnist_test_arrays):
    images, labels = mnist_test_arrays
    direct, _ = evaluate.evaluate_export(model_base_path / "1", images[:N], labels[:N])
    assert report[1]["variants"][0]["accuracy"] == direct["accuracy"]


@pytest.mark.parametrize("name", list(robustness.CORRUPTIONS))
def test_each_corruption_changes_the_digits_deterministically(name, mnist_test_arrays):
    images = mnist_test_arrays[0][:N]
    corrupt = robustness.CORRUPTIONS[name][1]
    first = corrupt(images, np.random.default_rng(7))
    assert first.shape == images.shape and first.dtype == np.uint8
    assert (first != images).any(axis=(1, 2, 3)).mean() > 0.9  # (nearly) every digit changes
    np.testing.assert_array_equal(first, corrupt(images, np.random.default_rng(7)))


def test_renderings_are_files_of_the_stated_kind(mnist_test_arrays):
    images = mnist_test_arrays[0][:2]
    rng = np.random.default_rng(0)
    rgba = robustness.RENDERINGS["file_png_rgba_280"][1](images, rng)[0]
    decoded = tf.io.decode_png(rgba, channels=0).numpy()
    assert decoded.shape == (280, 280, 4) and decoded[0, 0, 3] == 0  # transparent paper
    page = robustness.RENDERINGS["file_jpeg_rgb_page_800x600"][1](images, rng)[0]
    assert page.startswith(b"\xff\xd8") and tf.io.decode_jpeg(page).shape == (600, 800, 3)


def test_the_28x28_files_hold_the_digits_pixels_exactly(mnist_test_arrays):
    images = mnist_test_arrays[0][:8]
    files = samples.encode_pngs(images)
    assert all(f.startswith(b"\x89PNG") for f in files)
    np.testing.assert_array_equal(np.stack([tf.io.decode_png(f).numpy() for f in files]), images)


def test_inverted_and_black_on_white_digits_get_the_clean_answers(signature, mnist_test_arrays):
    images = mnist_test_arrays[0][:N]
    clean = robustness.predict_files(signature, samples.encode_pngs(images))
    inverted = robustness.predict_files(signature, samples.encode_pngs(robustness.invert(images, None)))
    paper = robustness.predict_files(signature, robustness.RENDERINGS["file_png_grey_28"][1](images, None))
    np.testing.assert_array_equal(inverted, clean)
    np.testing.assert_array_equal(paper, clean)


def test_refused_images_count_as_wrong_without_failing_their_batch(signature, mnist_test_arrays):
    images = mnist_test_arrays[0][:5]
    files = samples.encode_pngs(images)
    files.insert(2, samples.encode_pngs(np.zeros((1, 28, 28, 1), np.uint8))[0])  # blank: "no ink found"
    predicted = robustness.predict_files(signature, files)
    assert predicted[2] == -1
    np.testing.assert_array_equal(np.delete(predicted, 2), robustness.predict_files(signature, files[:2] + files[3:]))


def criterion(summary: dict, words: str) -> bool:
    """The verdict of the one criterion whose name holds these words."""
    [verdict] = [ok for name, ok in summary["criteria"].items() if words in name]
    return verdict


def test_summary_applies_the_done_criteria():
    results = [{"name": "clean", "group": "clean", "accuracy": 0.996},
               {"name": "a", "group": "corruption", "accuracy": 0.99},
               {"name": "b", "group": "corruption", "accuracy": 0.89},
               {"name": "f", "group": "file", "accuracy": 0.992}]
    summary = robustness.summarize(results)
    assert summary["corruption_mean_accuracy"] == pytest.approx(0.94)
    assert summary["corruptions_below_floor"] == ["b"] and summary["files_below_clean"] == ["f"]
    assert criterion(summary, "clean accuracy") is True  # 0.996
    assert criterion(summary, "corruption mean") is False  # 0.94
    assert criterion(summary, "no corruption below") is False  # b
    assert criterion(summary, "every file") is False  # f, 0.004 below clean
    assert "mnist_c_mean_accuracy" not in summary  # no MNIST-C rows, no MNIST-C criteria
    assert not [name for name in summary["criteria"] if "MNIST-C" in name]
    # Each verdict follows its own figure: b and f raised, every criterion is met; clean lowered, only its own
    # fails (the files are judged against it).
    met = [dict(r, accuracy=0.98) if r["name"] == "b" else dict(r, accuracy=0.995) if r["name"] == "f" else r
           for r in results]
    assert all(robustness.summarize(met)["criteria"].values()), robustness.summarize(met)["criteria"]
    lowered = robustness.summarize([dict(r, accuracy=0.99) if r["group"] == "clean" else r for r in met])
    assert [name for name, ok in lowered["criteria"].items() if not ok] == [
        name for name in lowered["criteria"] if "clean accuracy" in name]


def test_mnist_c_summary_keeps_the_families_training_saw_apart():
    seen_name = "shear"
    results = [{"name": "clean", "group": "clean", "accuracy": 0.996},
               {"name": "mnist_c_" + seen_name, "group": "mnist_c", "accuracy": 0.99,
                "seen_in_training": "affine augmentation (shear)"},
               {"name": "mnist_c_fog", "group": "mnist_c", "accuracy": 0.98, "seen_in_training": None},
               {"name": "mnist_c_zigzag", "group": "mnist_c", "accuracy": 0.95, "seen_in_training": None}]
    summary = robustness.summarize(results)
    assert summary["mnist_c_mean_accuracy"] == pytest.approx((0.99 + 0.98 + 0.95) / 3)
    assert summary["mnist_c_unseen_mean_accuracy"] == pytest.approx(0.965)
    assert summary["mnist_c_seen_mean_accuracy"] == pytest.approx(0.99)
    assert summary["mnist_c_min"] == ("mnist_c_zigzag", 0.95)
    assert criterion(summary, "MNIST-C mean >=") is True  # 0.9733 against 0.97
    assert criterion(summary, "did not see") is False  # 0.965


def test_the_families_a_model_saw_follow_its_training_config():
    plain = dataclasses.asdict(Config(line_probability=0, outline_probability=0))
    affine_and_noise = {"shot_noise", "impulse_noise", "shear", "scale", "rotate", "translate"}
    assert set(robustness.seen_in_training(plain)) == affine_and_noise
    assert set(robustness.seen_in_training(dataclasses.asdict(Config()))) == (
        affine_and_noise | {"dotted_line", "zigzag", "canny_edges"})  # the default draws lines and outlines
    lines = dataclasses.asdict(Config(line_probability=0.1, outline_probability=0, rotation_degrees=0))
    assert set(robustness.seen_in_training(lines)) == affine_and_noise - {"rotate"} | {"dotted_line", "zigzag"}
    assert robustness.seen_in_training(dataclasses.asdict(Config(augment=False))) == {}
    assert set(robustness.seen_in_training({})) == set(robustness.MNIST_C_AUGMENTATIONS)  # unknown: all it may have
    before_lines = {k: v for k, v in plain.items() if k != "line_probability"}
    assert set(robustness.seen_in_training(before_lines)) == affine_and_noise  # a setting that did not exist yet
