"""What does a second worker buy on one machine? Images/s of training, one process on two cores against two
workers (--strategy multi_worker over 127.0.0.1) of one core each:

    python -m bench.multi_worker                               # default network, 6,000 images, 2 epochs, twice
    python -m bench.multi_worker --repeats 1 --train-subset 2048 --conv1-filters 4   # a quick look

Layouts, the same flags for both (any training flag passes through):

- one:  `--strategy default`, one process pinned to cores 0 and 1 (taskset -c 0,1), batch --batch-size;
- two:  `--strategy multi_worker`, worker 0 pinned to core 0 and worker 1 to core 1 (TensorFlow sizes its thread
        pools to the cores a process may run on), each --batch-size, so the global batch is twice that.

Each process runs `training.train.fit` (the training command's own code, without the export) with
bench.training.EpochTimer and prints its epochs. The steady epoch is the last (the first traces the functions and
fills the caches). Throughput is the run's training images (all workers' shares) over the steady epoch's wall
seconds, validation and callbacks included, and over its training seconds alone (first batch to last). CPU
seconds are each process's own (user + system) summed over the processes: other work on the machine delays a
process but does not add to them, so images per CPU-second compares what the layouts cost even on a busy machine.
Every figure carries the 1-minute load average it was taken at. Each layout runs --repeats times, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.report import emit, free_ports, log

RESULT = "[bench-result] "
LAYOUTS = {"one": ["0,1"], "two": ["0", "1"]}  # the cores of each process




def worker(flags: list[str]) -> None:
    """One process of a layout: fit with an epoch timer, then print the epochs as one JSON line."""
    from bench.training import EpochTimer
    from training import mnist, train
    from training.config import Config, add_flags, from_args

    parser = argparse.ArgumentParser()
    add_flags(parser, Config(epochs=2, train_subset=6000, verbose=2))
    cfg = from_args(parser.parse_args(flags))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(cfg, run_dir=str(Path(tmp) / "run"))
        # The whole run's training images, over all workers (as data.split_names counts them). Not from the
        # dataset: reading it would start TensorFlow's runtime before MultiWorkerMirroredStrategy may configure it.
        available = mnist.TRAIN_SIZE - cfg.validation_size
        images = min(cfg.train_subset, available) if cfg.train_subset else available
        timer = EpochTimer(images)
        model = train.fit(cfg, [timer])
        cluster = train.scale(cfg, model.distribute_strategy)
        if cluster.workers > 1:
            train.end_together(model.distribute_strategy, chief=cluster.index == 0)
    print(RESULT + json.dumps({"index": cluster.index, "workers": cluster.workers, "images": images,
                               "global_batch": cluster.global_batch, "epochs": timer.epochs}), flush=True)


def run_layout(name: str, flags: list[str], logs: Path) -> dict[str, Any]:
    cores = LAYOUTS[name]
    ports = free_ports(len(cores))
    procs = []
    for index, core in enumerate(cores):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        strategy = "default"
        if len(cores) > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                           "task": {"type": "worker", "index": index}})
            strategy = "multi_worker"
        log_file = logs / f"{name}-{index}-{time.time_ns()}.log"
        with log_file.open("w") as out:
            procs.append((subprocess.Popen(
                ["taskset", "-c", core, sys.executable, "-m", "bench.multi_worker", "--worker",
                 "--strategy", strategy, *flags],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1]), log_file))
    results = []
    try:
        for proc, log_file in procs:
            proc.wait(timeout=3600)
            lines = [line for line in log_file.read_text().splitlines() if line.startswith(RESULT)]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{name}: a process failed; see {log_file}")
            results.append(json.loads(lines[-1].removeprefix(RESULT)))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return summarise(name, results)


def summarise(name: str, processes: list[dict[str, Any]]) -> dict[str, Any]:
    """The steady (last) epoch of a layout: the slowest process's wall seconds (the workers wait for each other
    at every step, so they end together), CPU seconds summed over the processes."""
    steady = [p["epochs"][-1] for p in processes]
    images = processes[0]["images"]
    seconds = max(e["seconds"] for e in steady)
    training = max(e["training_seconds"] for e in steady)
    cpu = round(sum(e["cpu_seconds"] for e in steady), 1)
    return {"layout": name, "processes": len(processes), "global_batch": processes[0]["global_batch"],
            "images": images, "epoch_seconds": seconds, "training_seconds": training, "cpu_seconds": cpu,
            "images_per_s": round(images / seconds), "training_images_per_s": round(images / training),
            "images_per_cpu_second": round(images / cpu, 1), "load_average": max(e["load_average"] for e in steady),
            "epochs": [p["epochs"] for p in processes]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternating")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--logs", default=None, help="keep the processes' logs here (default: a temporary dir)")
    args, flags = parser.parse_known_args(argv)
    results: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": len(os.sched_getaffinity(0))},
                               "flags": flags, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for repeat in range(args.repeats):
            for name in LAYOUTS:
                log(f"{name}, run {repeat + 1} of {args.repeats}, load average {os.getloadavg()[0]:.2f}")
                run = run_layout(name, flags, logs)
                log(f"{name}: {run['images_per_s']} images/s ({run['training_images_per_s']} in training alone), "
                    f"{run['images_per_cpu_second']} images per CPU-second, load average {run['load_average']}")
                results["runs"].append(run)
    emit(results, args.out)
    return results


if __name__ == "__main__":
    main()
