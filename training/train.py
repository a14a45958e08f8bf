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
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training import calibration, data, evaluate, export, mnist, samples
from training.config import Config, add_flags, from_args
from training.model import INPUT_SHAPE, build_model, float32_copy, resolve_precision


def log(message: str) -> None:
    print(f"[train] {message}", flush=True)


def learning_rate_schedule(cfg: Config, steps_per_epoch: int,
                           peak: float | None = None) -> keras.optimizers.schedules.LearningRateSchedule:
    """Per step: a linear warm-up from 0 to the peak (cfg.learning_rate, or `peak`: see `Scale`) over
    `warmup_epochs`, then a cosine decay that reaches 0 at the last step of the last epoch. The rate is a
    function of the optimizer's step count, which BackupAndRestore restores, so a resumed run continues the
    schedule where the killed one was."""
    peak = cfg.learning_rate if peak is None else peak
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch
    decay = max(1, cfg.epochs * steps_per_epoch - warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay, alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(0.0, decay, alpha=0.0, warmup_target=peak, warmup_steps=warmup)


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


def refresh_batch_norm(model: keras.Model, images: tf.data.Dataset, forward=None,
                       strategy: tf.distribute.Strategy | None = None) -> None:
    """Re-estimates every batch-norm layer's moving mean and variance for the weights the model holds now,
    as the average of the statistics of the batches of `images` (each batch's stats count equally).
    `forward(batch)` runs `model(batch, training=True)`; a caller that refreshes every epoch passes one
    tf.function, traced once, as eager calls are slower.

    With a multi-worker `strategy`, every worker passes its share of the images and the sums and batch counts
    are added up over the workers (`all_reduce_sum`), so that all of them hold the same statistics, those of all
    the batches; each worker on its own would normalise its validation share by statistics of its own."""
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
        if strategy is not None:
            shapes = [layer.moving_mean.shape for layer in norms for _ in range(2)]
            *flat, batches = all_reduce_sum(strategy, [np.broadcast_to(value, shape) for value, shape in
                                                       zip((v for pair in sums for v in pair), shapes)] + [batches])
            sums = [[flat[2 * i].astype(layer.moving_mean.dtype), flat[2 * i + 1].astype(layer.moving_mean.dtype)]
                    for i, layer in enumerate(norms)]
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
    averaged weights before each validation, so what is validated, checkpointed and exported agrees.
    With a multi-worker `strategy` each worker passes its share of the images (`refresh_batch_norm`)."""

    def __init__(self, images: tf.data.Dataset, strategy: tf.distribute.Strategy | None = None):
        super().__init__()
        self.images, self.strategy = images, strategy
        self.forward = None

    def on_test_begin(self, logs=None):
        if self.forward is None:
            self.forward = tf.function(lambda batch: self.model(batch, training=True))
        refresh_batch_norm(self.model, self.images, self.forward, self.strategy)


def all_reduce_sum(strategy: tf.distribute.Strategy, values: list) -> list[np.ndarray]:
    """Each value (array or number) summed over the workers of a multi-worker strategy, the same sums on every
    worker. A collective: every worker has to call it at the same point, with values of the same shapes.
    In float64, which holds float32 and bfloat16 values and integers below 2**53 exactly."""
    tensors = [tf.convert_to_tensor(value, tf.float64) for value in values]
    return [np.asarray(t) for t in strategy.experimental_local_results(_summing(strategy)(tensors))[0]]


@functools.cache
def _summing(strategy: tf.distribute.Strategy):
    """all_reduce_sum's function, one per strategy, so that a sum of the same shapes (every epoch's batch-norm
    statistics) is traced once."""

    def on_replica(tensors):  # identity puts the values on the replica's device, which the all-reduce wants
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                              [tf.identity(t) for t in tensors])

    @tf.function
    def reduce(tensors):
        return strategy.run(on_replica, args=(tensors,))

    return reduce


def end_together(strategy: tf.distribute.Strategy, chief: bool) -> None:
    """Holds every worker of a multi-worker run here until all have come (a collective): the other workers wait
    for the chief to have evaluated and exported. To TensorFlow's coordination service, which the chief hosts, a
    worker whose process ends while the others run on is a crashed task ("The tasks have crashed ... stopped
    sending heartbeats"); and if the chief fails, the workers waiting here fail too, so the run as a whole does.
    The chief comes here with the model published: if another worker is gone by then, that is logged, not
    raised, as a restarted cluster would train and publish the same model again."""
    try:
        all_reduce_sum(strategy, [0.0])
    except tf.errors.OpError as error:
        if not chief:
            raise
        log(f"the model is published, but a worker did not wait for the end: {type(error).__name__}")


def broadcast_from_chief(strategy: tf.distribute.Strategy, values: list, chief: bool) -> list[np.ndarray]:
    """The chief's `values` (arrays or numbers), on every worker: a sum over the workers of the chief's values
    and the others' zeros. A collective, as all_reduce_sum."""
    return all_reduce_sum(strategy, [value if chief else np.zeros(np.shape(value)) for value in values])


class ClusterBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore for a multi-worker run (Keras 3's callback knows nothing of workers), as Keras's
    multi-worker guide has it: the chief writes the backup in `backup_dir`; every other worker saves at the
    same points into a temporary directory of its own, removed as soon as it is written. Saving on every worker
    is the guide's guard against saves that read distributed variables through collectives, which all workers
    must join; Keras 3.15's saves here read none (a run whose other workers skipped them finished alike), so the
    guard costs one small write per epoch.

    On a (re)start the chief restores its backup, if there is one, and hands the weights, the optimizer's
    state and the epoch reached to every worker (`broadcast_from_chief`): a restarted worker needs no backup
    of its own, nor a file system shared with the chief, and all workers go on from the same state.

    The chief's backup outlives fit: run() removes it once the model is published, so that workers restarted
    after a failure during the chief's evaluation or export resume at the end of training instead of training
    again."""

    def __init__(self, backup_dir: Path, strategy: tf.distribute.Strategy, chief: bool):
        self.strategy, self.chief = strategy, chief
        scratch = Path(tempfile.gettempdir()) / f"mnist-backup-{uuid.uuid4().hex}"  # made by each save
        super().__init__(str(backup_dir if chief else scratch), delete_checkpoint=not chief)

    def on_train_begin(self, logs=None):
        if self.chief:
            super().on_train_begin(logs)  # loads the backup, if any
        variables = list({id(v): v for v in [*self.model.weights, *self.model.optimizer.variables]}.values())
        for variable, value in zip(variables, broadcast_from_chief(self.strategy, [v.numpy() for v in variables],
                                                                   self.chief)):
            variable.assign(value.astype(variable.dtype))
        [epoch] = broadcast_from_chief(self.strategy, [self.model._initial_epoch or 0], self.chief)
        self.model._initial_epoch = int(epoch)
        if self.model._initial_epoch:
            log(f"resuming from the chief's backup after epoch {self.model._initial_epoch} of {self.params['epochs']}")

    def _save_model(self):
        try:
            super()._save_model()
        finally:
            if not self.chief:
                shutil.rmtree(self.backup_dir, ignore_errors=True)


class ScratchModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of a worker that is not the chief: it saves when the chief does (the validation
    figures it decides on are summed over the workers, the same on every one), into a temporary directory
    that is removed at once; why every worker saves: ClusterBackupAndRestore."""

    def __init__(self, monitor: str):
        scratch = Path(tempfile.gettempdir()) / f"mnist-checkpoint-{uuid.uuid4().hex}"
        super().__init__(str(scratch / "best.keras"), monitor=monitor, save_best_only=True)

    def _save_model(self, epoch, batch, logs):
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            shutil.rmtree(os.path.dirname(self.filepath), ignore_errors=True)


def callbacks(cfg: Config, run_dir: Path, share: tf.Variable | None = None,
              cluster: Scale | None = None, strategy: tf.distribute.Strategy | None = None
              ) -> list[keras.callbacks.Callback]:
    """The callbacks of fit. In a multi-worker run (`cluster` of more than one worker, and its `strategy`) the
    chief writes the backup, best.keras, TensorBoard and history.csv under `run_dir`; the other workers write
    nothing there (`ClusterBackupAndRestore`, `ScratchModelCheckpoint`), so every worker may be given the same
    --run-dir."""
    multi = cluster is not None and cluster.workers > 1
    chief = is_chief()
    backup = run_dir / "backup"
    resuming = chief and backup.exists() and any(backup.iterdir())
    if resuming:
        log(f"resuming the interrupted run from {backup}")
    if multi:
        backup_and_restore = ClusterBackupAndRestore(backup, strategy, chief)
    else:
        backup_and_restore = keras.callbacks.BackupAndRestore(str(backup))
    if chief:
        checkpoint = keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), monitor=cfg.monitor,
                                                     save_best_only=True)
    else:
        checkpoint = ScratchModelCheckpoint(cfg.monitor)
    return [
        backup_and_restore,
        # With --ema the average is what is validated, checkpointed and, at the end, exported; BackupAndRestore,
        # before it, backs up the raw weights and the average as they are. Nothing ends a run early: the
        # schedule's low-rate end is where the last errors go, and which epoch the validation loss favours
        # is largely noise.
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []),
        *([BatchNormForAverage(clean_training_images(cfg, cfg.epoch_batch_norm_batches, cluster),
                               strategy if multi else None)]
          if cfg.ema and cfg.batch_norm else []),
        checkpoint,
        LogLearningRate(),
        *([PlainFinish(share, cfg)] if share is not None else []),
        *([keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
           keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resuming)] if chief else []),
    ]


def clean_training_images(cfg: Config, batches: int | None = None, cluster: Scale | None = None) -> tf.data.Dataset:
    """The first `batches` (default cfg.batch_norm_batches) batches of training images as served (no
    augmentation), without labels: what re-estimates the batch-norm statistics of the averaged weights.
    Taken before the pipeline's cache, so the cache holds just these and is read whole every time.
    With a multi-worker `cluster`: this worker's share of the first `batches` global batches, in batches of
    its replicas' size."""
    batches = cfg.batch_norm_batches if batches is None else batches
    if cluster is None or cluster.workers == 1:
        images = data.load_split(cfg, "train").take(batches * cfg.batch_size)
        return data.pipeline(images, cfg, training=False).map(lambda x, y: x)
    first = dataclasses.replace(cfg, train_subset=min(batches * cluster.global_batch,
                                                      cfg.train_subset or mnist.TRAIN_SIZE))
    images = data.load_split(first, "train", cluster.workers, cluster.index)
    return data.pipeline(images, cluster.worker_config(cfg), training=False).map(lambda x, y: x)


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
    """Whether this process is the chief: the one that writes the run's records, evaluates and exports. That is
    the task of type chief, or worker 0 of a cluster that names no chief (`Scale.index` 0); a process without
    $TF_CONFIG is its own chief."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    first_worker = task.get("type") == "worker" and task.get("index", 0) == 0 and "chief" not in config.get(
        "cluster", {})
    return task.get("type", "chief") == "chief" or first_worker


@dataclasses.dataclass(frozen=True)
class Scale:
    """How a run is spread, and the batch and peak learning rate that go with it (`scale`)."""

    workers: int  # training processes: 1 unless --strategy multi_worker
    index: int  # this process's place among them; 0 is the chief, which evaluates and exports
    replicas: int  # replicas in sync over all workers (strategy.num_replicas_in_sync)
    global_batch: int  # images per optimizer step, over all replicas
    learning_rate: float  # the schedule's peak

    def worker_config(self, cfg: Config) -> Config:
        """The settings this worker's input pipeline runs with: its replicas' batch, and a seed of its own, so
        that workers shuffle and augment their shares differently (worker 0 keeps cfg's, as a single process)."""
        return dataclasses.replace(cfg, seed=cfg.seed + 1000 * self.index,
                                   batch_size=self.global_batch // self.replicas)

    def describe(self, cfg: Config) -> str:
        if self.workers == 1:
            return f"global batch {self.global_batch}, peak learning rate {self.learning_rate:.3g} (one process)"
        return (f"global batch {self.global_batch} = {cfg.batch_size} x {self.workers} workers, peak learning rate "
                f"{self.learning_rate:.3g} = {cfg.learning_rate:.3g} x sqrt({self.workers})")


def scale(cfg: Config, strategy: tf.distribute.Strategy) -> Scale:
    """The one rule for the batch and the learning rate as workers are added.

    One process (default, one_device, mirrored): --batch-size is the global batch, which Keras splits over the
    process's replicas, and --learning-rate the peak rate, both as given: those runs train as they always did.

    k workers (multi_worker): --batch-size is each worker's batch, so that a worker's step costs what a
    single process's step does and an epoch takes 1/k of the steps; the global batch is k x --batch-size.
    The peak rate grows as sqrt(k), the square-root rule that fits Adam (Malladi et al. 2022, "On the SDEs and
    scaling rules for adaptive gradient algorithms"): the k-fold batch cuts the gradient noise k-fold, and the
    linear rule that suits SGD (Goyal et al. 2017) overshoots with Adam's normalised steps. The warm-up stays
    in epochs, so it spans 1/k of the steps as well."""
    replicas, workers = strategy.num_replicas_in_sync, 1
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        resolver = strategy.cluster_resolver  # $TF_CONFIG; without it, one worker
        jobs = resolver.cluster_spec().as_dict()
        workers = len(jobs.get("chief", [])) + len(jobs.get("worker", []))
    if workers <= 1:
        return Scale(1, 0, replicas, cfg.batch_size, cfg.learning_rate)
    # the chief, if the cluster names one, is first; then the workers in order (as the InputContext counts them)
    index = resolver.task_id + (1 if resolver.task_type == "worker" and "chief" in jobs else 0)
    return Scale(workers, index, replicas, cfg.batch_size * workers, cfg.learning_rate * math.sqrt(workers))


@dataclasses.dataclass(frozen=True)
class ClusterData:
    """A split as the workers of a multi-worker run read it (`cluster_dataset`)."""

    dataset: tf.distribute.DistributedDataset  # endless: `steps` of it are one pass over the split
    steps: int  # steps (global batches) per pass, the same on every worker
    element_spec: Any  # this worker's (images, labels) batches, as tf.TensorSpecs


def cluster_dataset(cfg: Config, strategy: tf.distribute.Strategy, cluster: Scale, split: str,
                    share: tf.Variable | None = None) -> ClusterData:
    """One split as the workers of a multi-worker run read it: each worker builds the pipeline of its own share
    of the split (data.worker_share) with its own seed and its replicas' batch (Scale.worker_config), through
    strategy.distribute_datasets_from_function, so that nothing is auto-sharded (see data.worker_share) and no
    worker decodes or augments an image another one trains on.

    The dataset repeats, and fit is given its steps per pass: Keras then keeps one iterator for the whole run.
    Keras makes a new iterator at each epoch otherwise, and a distributed iterator over the augmenting pipeline
    took seconds to make, with every worker waiting at the first step of each epoch (2 to 30 s measured here).
    The images' height and width are set again after the augmentation, which leaves them unknown."""
    specs = []

    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        images = data.load_split(cfg, split, context.num_input_pipelines, context.input_pipeline_id)
        batches = data.pipeline(images, cluster.worker_config(cfg), training=split == "train", share=share)
        batches = batches.map(lambda x, y: (tf.ensure_shape(x, [None, *INPUT_SHAPE]), y))
        specs.append(batches.element_spec)
        return batches.repeat()

    dataset = strategy.distribute_datasets_from_function(make)
    images = int(data.load_split(cfg, split, cluster.workers, cluster.index).cardinality())
    local_replicas = cluster.replicas // cluster.workers
    steps = math.ceil(math.ceil(images / (cluster.global_batch // cluster.replicas)) / local_replicas)
    return ClusterData(dataset, steps, specs[0])


def fit_across_workers(model: keras.Model, strategy: tf.distribute.Strategy, element_spec: Any) -> None:
    """Mends, on this model only, the two steps of Keras 3.15's fit and evaluate that fail under
    MultiWorkerMirroredStrategy (keras-team/keras#20585):

    1. Before the first step Keras builds the loss and metrics from a batch it averages over the replicas with
       strategy.reduce, which this strategy refuses for a structure of per-replica values such as an
       (images, labels) pair ("Attempt to convert a value (PerReplica...) to a Tensor"). Only the batch's shapes
       and dtypes are used: they are built from this worker's `element_spec` instead, which also takes no batch
       from the data.
    2. After every step Keras averages the step's figures over the replicas with strategy.reduce("MEAN", value,
       axis=0), which fails for a scalar ("Invalid reduction dimension 0 for input with 0 dimensions",
       tensorflow/tensorflow#72388). The steps return each figure as a vector of one, which that reduce averages
       into the scalar Keras expects. (The epoch's figures are read from the metrics, summed over the workers.)"""

    def build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=element_spec)

    def vectors(step):
        return lambda data: tf.nest.map_structure(lambda v: tf.reshape(v, [1]), step(data))

    model._maybe_symbolic_build = build
    model.train_step, model.test_step = vectors(model.train_step), vectors(model.test_step)


def steps_per_execution(cfg: Config, strategy: tf.distribute.Strategy) -> int:
    """cfg.steps_per_execution on one replica; 1 across replicas, where Keras 3.15's multi-step loop fails
    ("You must feed a value for placeholder tensor" under MirroredStrategy and MultiWorkerMirroredStrategy)."""
    return cfg.steps_per_execution if strategy.num_replicas_in_sync == 1 else 1


def steps_per_epoch(train: tf.data.Dataset) -> int:
    steps = int(train.cardinality())
    if steps < 0:
        raise ValueError("the training dataset's length is unknown: the schedule needs its steps per epoch")
    return steps


def fit(cfg: Config, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> keras.Model:
    seed_everything(cfg)
    strategy = make_strategy(cfg)
    cluster = scale(cfg, strategy)
    share = tf.Variable(1.0, trainable=False, name="augmentation_share") if cfg.plain_epochs > 0 else None
    steps = {}  # fit's steps per pass (multi-worker: the datasets repeat, see cluster_dataset)
    if cluster.workers == 1:
        train = data.pipeline(data.load_split(cfg, "train"), cfg, training=True, share=share)
        validation = data.pipeline(data.load_split(cfg, "validation"), cfg, training=False)
        train_steps = steps_per_epoch(train)
    else:
        train_data = cluster_dataset(cfg, strategy, cluster, "train", share)
        validation_data = cluster_dataset(cfg, strategy, cluster, "validation")
        train, validation, train_steps = train_data.dataset, validation_data.dataset, train_data.steps
        steps = {"steps_per_epoch": train_data.steps, "validation_steps": validation_data.steps}
    precision = resolve_precision(cfg.precision)
    with strategy.scope():
        model = build_model(cfg, precision)
        optimizer = AdamWAverage(learning_rate_schedule(cfg, train_steps, peak=cluster.learning_rate),
                                 weight_decay=cfg.weight_decay, use_ema=cfg.ema, ema_momentum=cfg.ema_momentum)
        model.compile(optimizer=optimizer,
                      loss=SparseSmoothedCrossentropy(cfg.label_smoothing), metrics=["accuracy"],
                      steps_per_execution=steps_per_execution(cfg, strategy))
    if cluster.workers > 1:
        fit_across_workers(model, strategy, train_data.element_spec)
    log(f"model {model.name}: {model.count_params():,} parameters; training {cfg.epochs} epochs of "
        f"{data.split_names(cfg)['train']} at batch {cfg.batch_size} on {strategy.num_replicas_in_sync} "
        f"replica(s) ({type(strategy).__name__}), {precision}")
    log(cluster.describe(cfg) + (f"; worker {cluster.index} of {cluster.workers}, {train_steps} steps per epoch"
                                 if cluster.workers > 1 else ""))
    run_dir = Path(cfg.run_dir)
    if is_chief():
        run_dir.mkdir(parents=True, exist_ok=True)
    model.fit(train, validation_data=validation, epochs=cfg.epochs, verbose=cfg.verbose,
              shuffle=False,  # the pipeline shuffles; Keras ignores shuffle=True for a tf.data input, with a warning
              callbacks=callbacks(cfg, run_dir, share, cluster, strategy) + list(extra_callbacks or []), **steps)
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
    strategy = model.distribute_strategy
    train_seconds = time.monotonic() - start
    cluster = scale(cfg, strategy)
    if not is_chief():
        log("trained; the chief evaluates and exports")
        if cluster.workers > 1:
            end_together(strategy, chief=False)
        return {}
    precision = model.dtype_policy.name  # what --precision resolved to in fit()
    if (exported := float32_copy(model, cfg)) is not model:
        log("exporting the float32 twin of the mixed-precision model")
        model = exported
    elif cluster.workers > 1:
        # A model of the multi-worker strategy would run predict() across the workers, which have finished: the
        # chief calibrates, evaluates and exports a copy of its own.
        model = build_model(cfg, "float32")
        model.set_weights(exported.get_weights())
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
        if cluster.workers > 1:  # config holds the flags; these are what they came to on this cluster
            metrics["distribution"] = {"workers": cluster.workers, "global_batch": cluster.global_batch,
                                       "peak_learning_rate": cluster.learning_rate}
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
    if cluster.workers > 1:
        shutil.rmtree(Path(cfg.run_dir) / "backup", ignore_errors=True)  # see ClusterBackupAndRestore
        end_together(strategy, chief=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    run(from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
