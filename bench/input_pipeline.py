"""Is the input pipeline the bottleneck? Images/s of the training pipeline alone against a training step alone.

    python -m bench.input_pipeline [--steps 100] [--out docs/input_pipeline.json]

Both are measured after a warm-up (the first pass fills the pipeline's cache), on the real MNIST training
split with the default config. The pipeline keeps up when its rate is well above the training rate, and
prefetch then overlaps the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from training import data
from training.config import Config
from training.model import build_model


def pipeline_rate(cfg: Config, steps: int) -> float:
    ds = data.pipeline(data.load_split(cfg, "train"), cfg, training=True)
    for _ in ds:  # one pass fills the cache, as the first epoch does
        pass
    start, seen = time.perf_counter(), 0
    for _, labels in ds.take(steps):
        seen += int(labels.shape[0])
    return seen / (time.perf_counter() - start)


def training_rate(cfg: Config, steps: int) -> float:
    model = build_model(cfg)
    model.compile(optimizer=keras.optimizers.AdamW(cfg.learning_rate), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((cfg.batch_size, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, cfg.batch_size))
    fixed = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(fixed, steps_per_epoch=5, verbose=0)  # traces the train step
    start = time.perf_counter()
    model.fit(fixed, steps_per_epoch=steps, verbose=0)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data-dir", default=Config.data_dir)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cfg = Config(data_dir=args.data_dir)
    results = {
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "batch_size": cfg.batch_size,
        "pipeline_images_per_s": round(pipeline_rate(cfg, args.steps)),
        "pipeline_no_augment_images_per_s": round(pipeline_rate(Config(data_dir=args.data_dir, augment=False),
                                                                args.steps)),
        "training_step_images_per_s": round(training_rate(cfg, args.steps)),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
