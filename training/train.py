"""Trains the MNIST classifier, evaluates it through its exported signature and publishes it.

    python -m training.train --export-dir models/mnist

Stages: prepare the data (offline if need be), train with Keras callbacks (warm-up + cosine learning-rate
schedule run to its end, the best validated epoch saved as a record, TensorBoard, CSV log, and
BackupAndRestore so that a killed run started again resumes at the epoch it reached), stage the SavedModel
of the weights at the end of the schedule, evaluate it on the test set fed PNG bytes, then publish it as
`<export-dir>/<N>/` with its metrics, and write reports (metrics.json, plots). Every hyperparameter is a
flag: see `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training import calibration, data, evaluate, export, mnist, samples
from training.config import Config, add_flags, from_args
from training.model import build_model, float32_copy, resolve_precision


def log(message: str) -> None:
    print(f"[train] {message}", flush=True)


def learning_rate_schedule(cfg: Config, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Per step: a linear warm-up from 0 to the peak over `warmup_epochs`, then a cosine decay that reaches 0
    at the last step of the last epoch. The rate is a function of the optimizer's step count, which
    BackupAndRestore restores, so a resumed run continues the schedule where the killed one was."""
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch
    decay = max(1, cfg.epochs * steps_per_epoch - warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay, alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(0.0, decay, alpha=0.0, warmup_target=cfg.learning_rate,
                                                  warmup_steps=warmup)


class LogLearningRate(keras.callbacks.Callback):
    """Puts the rate the optimizer has reached at the end of each epoch into the epoch's logs (history.csv,
    TensorBoard), as keras.callbacks.LearningRateScheduler does for per-epoch rates."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


@keras.saving.register_keras_serializable(package="mnist")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels against targets smoothed towards uniform: 1 - s + s/10 for the true
    class, s/10 for the others (Keras's label smoothing, which its sparse loss does not offer)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"),
                                    keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def refresh_batch_norm(model: keras.Model, images: tf.data.Dataset, forward=None) -> None:
    """Re-estimates every batch-norm layer's moving mean and variance for the weights the model holds now,
    as the average of the statistics of the batches of `images` (each batch's stats count equally).
    `forward(batch)` runs `model(batch, training=True)`; a caller that refreshes every epoch passes one
    tf.function, traced once, as eager calls are slower."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    forward = forward or tf.function(lambda batch: model(batch, training=True))
    momenta = [layer.momentum for layer in norms]
    sums, batches = [[0.0, 0.0] for _ in norms], 0
    try:
        for layer in norms:
            layer.momentum = 0.0  # each forward pass leaves that batch's statistics in the moving ones
        for batch in images:
            forward(batch)
            batches += 1
            for total, layer in zip(sums, norms):
                total[0] += layer.moving_mean.numpy()
                total[1] += layer.moving_variance.numpy()
        for (mean, variance), layer in zip(sums, norms):
            if batches:
                layer.moving_mean.assign(mean / batches)
                layer.moving_variance.assign(variance / batches)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


@keras.saving.register_keras_serializable(package="mnist")
class AdamWAverage(keras.optimizers.AdamW):
    """AdamW whose weight average (`use_ema`) warms up as tf.train.ExponentialMovingAverage's does with
    `num_updates`: the momentum at step t is min(ema_momentum, (1 + t) / (10 + t)). With Keras's fixed
    momentum, 0.999, a run of a few dozen steps exports an average still near the random initial weights;
    with the warm-up the average spans about a tenth of the steps taken until it reaches ema_momentum's
    horizon, (10m - 1) / (1 - m) steps for momentum m."""

    def update_step(self, gradient, variable, learning_rate):
        """Adam's update of one variable as TensorFlow's fused kernel (ResourceApplyAdam), one op where Keras
        runs several: the same arithmetic, lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)."""
        if self.amsgrad or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle, v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        step = keras.ops.cast(self.iterations, "float32")
        warm = keras.ops.minimum(self.ema_momentum, (1.0 + step) / (10.0 + step))
        momentum = keras.ops.where(keras.ops.equal(self.iterations, 0), 0.0, warm)  # the first step copies
        rate = 1.0 - momentum  # m * average + (1 - m) * var, rewritten in fewer ops (for every variable, every step)
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                average.assign_sub(keras.ops.cast(rate, var.dtype) * (average - var))


class PlainFinish(keras.callbacks.Callback):
    """Sets the share of the non-geometric augmentations (`data.augmenter`) at each epoch's start: 1 until the
    last `plain_epochs`, then 0. Keyed on the epoch number, so a run resumed by BackupAndRestore continues
    with the share its epoch had."""

    def __init__(self, share: tf.Variable, cfg: Config):
        super().__init__()
        self.share, self.first_plain = share, cfg.epochs - cfg.plain_epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.share.assign(0.0 if epoch >= self.first_plain else 1.0)


class BatchNormForAverage(keras.callbacks.Callback):
    """Keras averages only trainable variables (`use_ema`), so the batch-norm statistics in the model are
    those of the raw weights' activations. Placed after SwapEMAWeights, this re-estimates them for the
    averaged weights before each validation, so what is validated, checkpointed and exported agrees."""

    def __init__(self, images: tf.data.Dataset):
        super().__init__()
        self.images = images
        self.forward = None

    def on_test_begin(self, logs=None):
        if self.forward is None:
            self.forward = tf.function(lambda batch: self.model(batch, training=True))
        refresh_batch_norm(self.model, self.images, self.forward)


def callbacks(cfg: Config, run_dir: Path, share: tf.Variable | None = None) -> list[keras.callbacks.Callback]:
    backup = run_dir / "backup"
    resuming = backup.exists() and any(backup.iterdir())
    if resuming:
        log(f"resuming the interrupted run from {backup}")
    return [
        keras.callbacks.BackupAndRestore(str(backup)),
        # With --ema the average is what is validated, checkpointed and, at the end, exported; BackupAndRestore,
        # before it, backs up the raw weights and the average as they are. Nothing ends a run early: the
        # schedule's low-rate end is where the last errors go, and which epoch the validation loss favours
        # is largely noise.
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []),
        *([BatchNormForAverage(clean_training_images(cfg, cfg.epoch_batch_norm_batches))]
          if cfg.ema and cfg.batch_norm else []),
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), monitor=cfg.monitor, save_best_only=True),
        LogLearningRate(),
        *([PlainFinish(share, cfg)] if share is not None else []),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resuming),
    ]


def clean_training_images(cfg: Config, batches: int | None = None) -> tf.data.Dataset:
    """The first `batches` (default cfg.batch_norm_batches) batches of training images as served (no
    augmentation), without labels: what re-estimates the batch-norm statistics of the averaged weights.
    Taken before the pipeline's cache, so the cache holds just these and is read whole every time."""
    batches = cfg.batch_norm_batches if batches is None else batches
    images = data.load_split(cfg, "train").take(batches * cfg.batch_size)
    return data.pipeline(images, cfg, training=False).map(lambda x, y: x)


def seed_everything(cfg: Config) -> None:
    keras.utils.set_random_seed(cfg.seed)  # Python, NumPy and TensorFlow
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()


def make_strategy(cfg: Config) -> tf.distribute.Strategy:
    """The tf.distribute strategy the config names (one of config.STRATEGIES, which Config enforces); Keras's
    fit splits each batch across its replicas."""
    if cfg.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_cpus)
    if cfg.strategy == "one_device":
        accelerators = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(accelerators[0].name if accelerators else "/cpu:0")
    if cfg.strategy == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if cfg.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster and this task's role: $TF_CONFIG
    return tf.distribute.get_strategy()  # "default"


def is_chief() -> bool:
    """Only the chief (or worker 0) of a multi-worker cluster evaluates and exports."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    return task.get("type", "chief") == "chief" or (task.get("type") == "worker" and task.get("index", 0) == 0)


def steps_per_execution(cfg: Config, strategy: tf.distribute.Strategy) -> int:
    """cfg.steps_per_execution on one replica; 1 across replicas, where Keras 3.15's multi-step loop fails
    ("You must feed a value for placeholder tensor" under MirroredStrategy)."""
    return cfg.steps_per_execution if strategy.num_replicas_in_sync == 1 else 1


def steps_per_epoch(train: tf.data.Dataset) -> int:
    steps = int(train.cardinality())
    if steps < 0:
        raise ValueError("the training dataset's length is unknown: the schedule needs its steps per epoch")
    return steps


def fit(cfg: Config, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> keras.Model:
    seed_everything(cfg)
    strategy = make_strategy(cfg)
    share = tf.Variable(1.0, trainable=False, name="augmentation_share") if cfg.plain_epochs > 0 else None
    train = data.pipeline(data.load_split(cfg, "train"), cfg, training=True, share=share)
    validation = data.pipeline(data.load_split(cfg, "validation"), cfg, training=False)
    precision = resolve_precision(cfg.precision)
    with strategy.scope():
        model = build_model(cfg, precision)
        optimizer = AdamWAverage(learning_rate_schedule(cfg, steps_per_epoch(train)), weight_decay=cfg.weight_decay,
                                 use_ema=cfg.ema, ema_momentum=cfg.ema_momentum)
        model.compile(optimizer=optimizer,
                      loss=SparseSmoothedCrossentropy(cfg.label_smoothing), metrics=["accuracy"],
                      steps_per_execution=steps_per_execution(cfg, strategy))
    log(f"model {model.name}: {model.count_params():,} parameters; training {cfg.epochs} epochs of "
        f"{data.split_names(cfg)['train']} at batch {cfg.batch_size} on {strategy.num_replicas_in_sync} "
        f"replica(s) ({type(strategy).__name__}), {precision}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.fit(train, validation_data=validation, epochs=cfg.epochs, verbose=cfg.verbose,
              shuffle=False,  # the pipeline shuffles; Keras ignores shuffle=True for a tf.data input, with a warning
              callbacks=callbacks(cfg, run_dir, share) + list(extra_callbacks or []))
    return model


def calibrate(model: keras.Model, cfg: Config) -> tuple[float, dict[str, Any]]:
    """The softmax temperature fitted on the validation split (1.0 when off), and its figures."""
    if not cfg.calibrate:
        return 1.0, {}
    validation = data.pipeline(data.load_split(cfg, "validation"), cfg, training=False)
    labels = np.concatenate([y.numpy() for _, y in validation])
    probabilities = model.predict(validation, verbose=0)
    temperature = calibration.fit_temperature(probabilities, labels)
    report = {"temperature": temperature,
              "validation": calibration.calibration_report(probabilities, labels, temperature)}
    log(f"calibration: temperature {temperature:.3f}; validation ECE "
        f"{report['validation']['ece_before']:.4f} -> {report['validation']['ece_after']:.4f}")
    return temperature, report


def run(cfg: Config, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> dict[str, Any]:
    """The whole job; returns the metrics that were published with the model."""
    start = time.monotonic()
    log("stage 1/4: data")
    mnist.prepare(cfg.data_dir)
    log("stage 2/4: training")
    model = fit(cfg, extra_callbacks)
    train_seconds = time.monotonic() - start
    if not is_chief():
        log("trained; the chief evaluates and exports")
        return {}
    precision = model.dtype_policy.name  # what --precision resolved to in fit()
    if (exported := float32_copy(model, cfg)) is not model:
        log("exporting the float32 twin of the mixed-precision model")
        model = exported
    if cfg.ema and cfg.batch_norm:  # the statistics of the exported weights, measured as they will compute
        refresh_batch_norm(model, clean_training_images(cfg))

    temperature, calibrated = calibrate(model, cfg)
    log("stage 3/4: staging the SavedModel and evaluating it on the test set, fed PNG bytes")
    images, labels = evaluate.load_test_arrays(cfg)
    staged = export.stage(model, cfg.export_dir, samples.encode_pngs(images[:8]), temperature=temperature)
    try:
        test, probabilities = evaluate.evaluate_export(staged, images, labels)
        if calibrated:  # the export's probabilities are calibrated; undo T for the figures before
            calibrated["test"] = calibration.calibration_report(
                calibration.scale_probabilities(probabilities, 1.0 / temperature), labels, temperature)
            log(f"test ECE {calibrated['test']['ece_before']:.4f} -> {calibrated['test']['ece_after']:.4f}")
        metrics = {"test": test, "calibration": calibrated, "train_seconds": round(train_seconds, 1),
                   "config": cfg.to_dict(), "training_precision": precision,
                   "tensorflow": tf.__version__, "keras": keras.__version__}
        log(f"test accuracy {test['accuracy']:.4f} ({test['errors']} errors in {test['examples']}), "
            f"loss {test['loss']:.4f}")
        log("stage 4/4: publishing")
        path = export.publish(staged, metrics)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    metrics["export_path"] = str(path)
    reports = evaluate.write_reports(cfg.reports_dir, metrics, images, labels, probabilities,
                                     Path(cfg.run_dir) / "history.csv")
    log(f"exported {path}; reports in {reports}; {time.monotonic() - start:.0f} s in all")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    run(from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
