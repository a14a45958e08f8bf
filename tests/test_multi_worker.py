"""Multi-worker training with real workers: two `python -m training.train --strategy multi_worker` processes on
127.0.0.1, each told its place by TF_CONFIG, train one model together (tf.distribute.MultiWorkerMirroredStrategy),
and the chief alone evaluates and exports it.

The test kills a worker in the middle of the run and restarts whatever exits with an error with the same
command, as Kubernetes does for a Job's pods with restartPolicy OnFailure (k8s/training-job.yaml): the other
worker fails by itself within seconds (its collectives lose their peer), and the restarted pair resumes from the
chief's backup (docs/multi_worker.md). The network is the smallest that trains, on a slice of MNIST, so that
process start-up, tracing and the chief's export, not training, take most of the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bench.report import free_ports
from training import export

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
TINY = ["--validation-size", "256", "--test-subset", "32", "--batch-size", "64", "--conv1-filters", "4",
        "--conv2-filters", "8", "--conv3-filters", "8", "--fc1-units", "32", "--fc2-units", "16", "--no-augment",
        "--epoch-batch-norm-batches", "2", "--batch-norm-batches", "4", "--no-calibrate", "--verbose", "0"]
PROCESS_SECONDS = 300  # a worker's whole run, start-up to exit, on a busy 2-core machine is well under this



class Cluster:
    """Two workers on loopback: the same command for each, TF_CONFIG telling each its index. Each worker has its
    own --run-dir, --reports-dir and temporary directory (TMPDIR), as on two hosts; the export dir is shared."""

    def __init__(self, tmp_path: Path, data_dir: str, flags: list[str]):
        self.tmp_path, self.data_dir, self.flags = tmp_path, data_dir, flags
        self.workers = [f"127.0.0.1:{port}" for port in free_ports(WORKERS)]
        self.models = tmp_path / "models"
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, list[Path]] = {index: [] for index in range(WORKERS)}

    def start(self, index: int) -> None:
        tf_config = {"cluster": {"worker": self.workers}, "task": {"type": "worker", "index": index}}
        scratch = self.tmp_path / f"tmp{index}"
        scratch.mkdir(exist_ok=True)
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2")
        log = self.tmp_path / f"worker{index}.{len(self.logs[index])}.log"
        self.logs[index].append(log)
        command = [sys.executable, "-m", "training.train", "--strategy", "multi_worker", "--data-dir", self.data_dir,
                   "--run-dir", str(self.tmp_path / f"run{index}"),
                   "--reports-dir", str(self.tmp_path / f"reports{index}"), "--export-dir", str(self.models),
                   *self.flags]
        with log.open("w") as out:
            self.procs[index] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self, index: int, attempt: int = -1) -> str:
        return self.logs[index][attempt].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for logs in self.logs.values() for log in logs)

    def stop(self) -> None:
        """Kills every worker still running: no process outlives its test."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def chief_backup(cluster: Cluster) -> Path:
    return cluster.tmp_path / "run0" / "backup" / "training_metadata.json"


@pytest.mark.timeout(600)
def test_two_workers_train_one_model_resume_after_a_kill_and_only_the_chief_exports_it(
        tmp_path, data_dir, mnist_png_bytes):
    """Worker 1 is killed one second into the second of three epochs, after the chief backed up the first.
    Every worker that exits with an error is started again with its own command, once or twice. The restarted
    pair then trains one model, which the chief alone evaluates and exports. (One run for both: a cluster's
    start-up, tracing and export take most of a minute here.)"""
    cluster = Cluster(tmp_path, data_dir, ["--train-subset", "2048", "--epochs", "3", *TINY])
    exits: dict[int, list[int]] = {index: [] for index in range(WORKERS)}
    try:
        for index in range(WORKERS):
            cluster.start(index)
        deadline = time.monotonic() + PROCESS_SECONDS
        while not chief_backup(cluster).exists():
            assert all(proc.poll() is None for proc in cluster.procs.values()), cluster.tails()
            assert time.monotonic() < deadline, "the chief backed up no epoch\n" + cluster.tails()
            time.sleep(0.1)
        time.sleep(1)
        cluster.procs[1].kill()
        deadline = time.monotonic() + 2 * PROCESS_SECONDS
        while not all(codes and codes[-1] == 0 for codes in exits.values()):
            assert time.monotonic() < deadline, cluster.tails()
            for index, proc in cluster.procs.items():
                if (exits[index] and exits[index][-1] == 0) or proc.poll() is None:
                    continue
                exits[index].append(proc.returncode)
                if proc.returncode != 0:
                    assert len(exits[index]) <= 3, cluster.tails()
                    cluster.start(index)
            time.sleep(0.2)
    finally:
        cluster.stop()

    assert exits[1][0] < 0  # killed
    assert exits[0][0] == 1, cluster.tails()  # the survivor failed by itself: its peer was gone
    assert "UnavailableError" in cluster.output(0, 0)
    resumed_chief, resumed_other = cluster.output(0), cluster.output(1)
    assert "resuming the interrupted run from" in resumed_chief
    for text in (resumed_chief, resumed_other):  # killed in the second epoch, or at the latest in the third
        assert ("resuming from the chief's backup after epoch 1 of 3" in text
                or "resuming from the chief's backup after epoch 2 of 3" in text), text
    assert export.versions(cluster.models) == [1]
    assert "stage 4/4: publishing" in resumed_chief and not any(
        "stage 4/4" in cluster.output(0, attempt) for attempt in range(len(cluster.logs[0]) - 1))

    for index, text in enumerate((resumed_chief, resumed_other)):
        assert "global batch 128 = 64 x 2 workers, peak learning rate 0.00283 = 0.002 x sqrt(2)" in text
        assert f"worker {index} of 2, 16 steps per epoch" in text  # 1,024 images each: its half of the 2,048
    assert "stage 3/4" not in resumed_other and "the chief evaluates and exports" in resumed_other
    # The chief keeps the run's records; the other worker left nothing behind, here or in its temporary dir.
    assert {"best.keras", "history.csv", "tensorboard"} <= {p.name for p in (tmp_path / "run0").iterdir()}
    assert not (tmp_path / "run0" / "backup").exists()  # a finished run's backup is removed
    assert not (tmp_path / "run1").exists() and not (tmp_path / "reports1").exists()
    assert not [p for p in (tmp_path / "tmp1").iterdir() if p.name.startswith("mnist-")]

    signature = tf.saved_model.load(str(cluster.models / "1")).signatures["serving_default"]
    images = [png for png, _ in mnist_png_bytes]
    outputs = signature(image_bytes=tf.constant(images))
    digits, probabilities = outputs["digit"].numpy(), outputs["probabilities"].numpy()
    assert digits.shape == (len(images),) and set(digits) <= set(range(10))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(digits, probabilities.argmax(axis=1))
