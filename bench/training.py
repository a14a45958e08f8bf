"""Where does an epoch of training go? One run times, with the default config (or the flags given):

    python -m bench.training --epochs 4 --baseline 466d904 --out docs/training_benchmark.json
    python -m bench.training --train-subset 2048 --epochs 2 --steps 5    # a quick look (what the tests run)

1. the input pipeline alone: images/s of `data.pipeline(train, training=True)` after a first pass has filled
   its cache, with the augmentation and without it (no model);
2. full epochs: `training.train.fit` (the training command's own code: callbacks, validation, batch-norm
   re-estimate) timed epoch by epoch, wall clock and this process's CPU seconds;
3. the train step alone: the model `fit` returned, trained on a few batches cached in memory, so neither the
   pipeline nor the callbacks cost anything.

Each figure carries the machine's 1-minute load average when it was taken: a figure taken beside other work
is not this code's speed. Throughput is training images over seconds; an epoch's seconds include its
validation and callbacks. The first epoch also traces the functions and fills the cache, so the steady
epoch is the median of the others. Each epoch also reports its CPU seconds and its longest call into the
train step: a call of seconds means the machine stopped running this process (seen here: 7-20 s pauses on
a shared VM), and the CPU seconds, which such pauses do not inflate, show whether the code or the machine
changed.

`--baseline REV` first runs this same file against a checkout of an earlier commit (a temporary git
worktree, with the same data and flags), so both sets of figures come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from training import data, mnist, train
from training.config import Config, add_flags, from_args


def log(message: str) -> None:  # not bench.report's: --baseline runs this file against older checkouts
    print(f"[bench] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def pipeline_rate(cfg: Config, steps: int) -> dict[str, Any]:
    """Images/s of the training pipeline once its cache is full (the first pass fills it, as epoch 1 does)."""
    ds = data.pipeline(data.load_split(cfg, "train"), cfg, training=True)
    for _ in ds:
        pass
    start, cpu, seen = time.perf_counter(), cpu_seconds(), 0
    for _, labels in ds.take(steps):
        seen += int(labels.shape[0])
    seconds = time.perf_counter() - start
    return {"images_per_s": round(seen / seconds), "cpu_seconds_per_1000_images": round(
        (cpu_seconds() - cpu) / seen * 1000, 3), "images": seen, "load_average": load_average()}


class EpochTimer(keras.callbacks.Callback):
    """Wall and CPU seconds of each epoch, from its first batch to the end of its validation and callbacks,
    and the longest wait between two calls into the train step (a stall shows there)."""

    def __init__(self, images: int):
        super().__init__()
        self.images, self.epochs = images, []

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.cpu, self.batch_ends = time.perf_counter(), cpu_seconds(), []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        seconds = end - self.start
        gaps = [b - a for a, b in zip([self.start, *self.batch_ends], self.batch_ends)]
        self.epochs.append({"epoch": epoch + 1, "seconds": round(seconds, 2),
                            "training_seconds": round(self.batch_ends[-1] - self.start, 2) if gaps else None,
                            "cpu_seconds": round(cpu_seconds() - self.cpu, 1),
                            "images_per_s": round(self.images / seconds),
                            "longest_call_s": round(max(gaps), 3) if gaps else None,
                            "load_average": load_average()})
        log(f"epoch {epoch + 1}: {seconds:.1f} s ({self.epochs[-1]['training_seconds']} s training, longest call "
            f"{self.epochs[-1]['longest_call_s']} s, {self.epochs[-1]['cpu_seconds']} s of CPU), "
            f"load average {load_average()}")


def train_step_rate(model: keras.Model, cfg: Config, steps: int, cached_batches: int = 8) -> dict[str, Any]:
    """Images/s of the compiled train step on `cached_batches` augmented batches held in memory, timed from the
    end of the first call into it to the end of the last (fit's own start and end are not the step's)."""
    batches = data.pipeline(data.load_split(cfg, "train"), cfg, training=True).take(cached_batches).cache()
    for _ in batches:
        pass
    repeated = batches.repeat()
    model.fit(repeated, steps_per_epoch=5, epochs=1, verbose=0)  # any retracing happens here
    ends: list[tuple[float, float]] = []
    marker = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(
        (time.perf_counter(), cpu_seconds())))
    per_call = model.steps_per_execution if hasattr(model, "steps_per_execution") else 1
    model.fit(repeated, steps_per_epoch=max(steps, 2 * per_call), epochs=1, verbose=0, callbacks=[marker])
    (start, cpu), (end, cpu_end) = ends[0], ends[-1]
    images = (len(ends) - 1) * per_call * cfg.batch_size
    return {"images_per_s": round(images / (end - start)),
            "ms_per_step": round((end - start) / (images / cfg.batch_size) * 1000, 2),
            "cpu_seconds_per_1000_images": round((cpu_end - cpu) / images * 1000, 3),
            "load_average": load_average()}


def measure(cfg: Config, steps: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))},
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "load_average_at_start": load_average(),
    }
    mnist.prepare(cfg.data_dir)
    log("input pipeline alone, with and without augmentation")
    results["pipeline"] = pipeline_rate(cfg, steps)
    results["pipeline_no_augment"] = pipeline_rate(replace(cfg, augment=False), steps)
    log(f"pipeline: {results['pipeline']['images_per_s']:,} images/s augmented, "
        f"{results['pipeline_no_augment']['images_per_s']:,} without")
    log(f"{cfg.epochs} full epoch(s) through training.train.fit")
    timer = EpochTimer(int(data.load_split(cfg, "train").cardinality()))
    model = train.fit(cfg, [timer])
    results["epochs"] = timer.epochs
    steady = timer.epochs[1:] or timer.epochs
    results["steady_epoch_seconds"] = round(statistics.median(e["seconds"] for e in steady), 2)
    results["steady_epoch_cpu_seconds"] = round(statistics.median(e["cpu_seconds"] for e in steady), 1)
    log("train step alone on batches cached in memory")
    results["train_step"] = train_step_rate(model, cfg, steps)
    log(f"train step: {results['train_step']['images_per_s']:,} images/s")
    results["config"] = cfg.to_dict()
    return results


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options `names` (each taking a value, as `--name value` or `--name=value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


def measure_baseline(revision: str, argv: list[str], data_dir: str) -> dict[str, Any]:
    """This file's measurement run in a subprocess against a worktree of `revision`, whose `training`
    package it imports; only flags that revision's Config knows can be passed."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        checkout, out = Path(tmp) / "checkout", Path(tmp) / "baseline.json"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "--quiet", str(checkout), revision],
                       check=True)
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            log(f"baseline: {revision} ({commit}) in a temporary worktree")
            args = [__file__, *argv, "--data-dir", str(Path(data_dir).resolve()), "--out", str(out)]
            script = f"import runpy, sys; sys.argv = {args!r}; runpy.run_path({__file__!r}, run_name='__main__')"
            subprocess.run([sys.executable, "-c", script], cwd=checkout, check=True,
                           env={**os.environ, "PYTHONPATH": ""})
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(checkout)], check=False)
        return {"revision": revision, "commit": commit, **json.loads(out.read_text())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="batches timed for the pipeline and the step")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="first measure a checkout of this git revision the same way, and compare")
    add_flags(parser, Config(epochs=2, verbose=2))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cfg = from_args(args)
    baseline = None
    if args.baseline:
        baseline = measure_baseline(args.baseline, without_options(argv, ("--baseline", "--out", "--data-dir")),
                                    cfg.data_dir)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh run: nothing to resume, nothing left behind
        results = measure(replace(cfg, run_dir=str(Path(tmp) / "run")), args.steps)
    if baseline:
        results["baseline"] = baseline
        for key in ("steady_epoch_seconds", "steady_epoch_cpu_seconds"):
            results[key.replace("seconds", "speedup")] = round(baseline[key] / results[key], 2)
        log(f"steady epoch: {results['steady_epoch_seconds']} s, baseline {baseline['commit']} "
            f"{baseline['steady_epoch_seconds']} s: {results['steady_epoch_speedup']}x; CPU seconds "
            f"{results['steady_epoch_cpu_seconds']} against {baseline['steady_epoch_cpu_seconds']}: "
            f"{results['steady_epoch_cpu_speedup']}x")
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
