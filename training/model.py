"""The prescribed network, in the Keras functional API with the task's layer names.

    input 28x28x1 -> conv1 -> pool1 -+-> conv2_1 -> pool2_1 -> conv3_1 -+-> conv3 (concatenate) -> pool3
                                     +-> conv2_2 -> pool2_2 -> conv3_2 -+
              -> flatten -> fc1 -> fc2 -> output (10, softmax)

Every nonlinearity is ReLU and every downsampling max-pooling. The two branches differ in kernel size,
so conv3 combines features seen at two scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers

from training.config import Config

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@keras.saving.register_keras_serializable(package="mnist")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's batch normalisation computed by TensorFlow's fused kernel (FusedBatchNormV3, a standard op
    that TF Serving runs): one op forward and one backward where Keras 3 composes moments, normalisation and
    their gradients from a dozen element-wise ops, so the train step runs faster.
    The moving statistics follow Keras's rule (biased batch variance); weights and saved files are Keras's."""

    def call(self, inputs, training=None, mask=None):
        fusable = inputs.shape.rank == 4 and self.axis in (-1, 3) and mask is None and not self.renorm
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, tf.float32)
        channels = tf.shape(x)[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        if not (training and self.trainable):
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon, is_training=False)
            return tf.cast(y, self.compute_dtype)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=self.epsilon,
                                                             is_training=True)
        n = tf.cast(tf.size(x) // channels, tf.float32)
        variance = variance * (n - 1.0) / n  # the kernel returns the unbiased variance; Keras keeps the biased
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX); elsewhere oneDNN emulates it, slowly."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `--precision`: auto is mixed_bfloat16 on CPUs with native bfloat16."""
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_bfloat16() and not tf.config.list_physical_devices("GPU") else "float32"
    return precision


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _conv(x, filters: int, kernel: int, name: str, cfg: Config):
    """Convolution -> (batch norm) -> ReLU; the activation layer carries the name when normalised."""
    if cfg.batch_norm:
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=name)(x)
        x = FusedBatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)
    return layers.Conv2D(filters, kernel, padding="same", activation="relu", name=name)(x)


def build_model(cfg: Config, policy: str = "float32") -> keras.Model:
    """Returns the uncompiled classifier: float32 [N, 28, 28, 1] in [0, 1] -> softmax [N, 10] (float32).
    `policy` is a Keras dtype policy: with mixed_bfloat16 the layers compute in bfloat16 on float32
    weights, and the softmax stays float32."""
    with dtype_policy(policy):
        inputs = keras.Input(shape=INPUT_SHAPE, name="pixels")
        x = _conv(inputs, cfg.conv1_filters, cfg.conv1_kernel, "conv1", cfg)
        x = layers.MaxPooling2D(2, name="pool1")(x)  # 14x14

        a = _conv(x, cfg.conv2_filters, cfg.branch1_kernel, "conv2_1", cfg)
        a = layers.MaxPooling2D(2, name="pool2_1")(a)  # 7x7
        a = _conv(a, cfg.conv3_filters, cfg.branch1_kernel, "conv3_1", cfg)

        b = _conv(x, cfg.conv2_filters, cfg.branch2_kernel, "conv2_2", cfg)
        b = layers.MaxPooling2D(2, name="pool2_2")(b)
        b = _conv(b, cfg.conv3_filters, cfg.branch2_kernel, "conv3_2", cfg)

        x = layers.Concatenate(name="conv3")([a, b])
        x = layers.MaxPooling2D(2, padding="same", name="pool3")(x)  # 4x4
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dropout(cfg.dropout, name="dropout1")(x)
        x = layers.Dense(cfg.fc1_units, activation="relu", name="fc1")(x)
        x = layers.Dropout(cfg.dropout, name="dropout2")(x)
        x = layers.Dense(cfg.fc2_units, activation="relu", name="fc2")(x)
        x = layers.Dropout(cfg.dropout * cfg.output_dropout_ratio, name="dropout3")(x)
        outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="output", dtype="float32")(x)
        return keras.Model(inputs, outputs, name="mnist_cnn")


def float32_copy(model: keras.Model, cfg: Config) -> keras.Model:
    """The same network and weights computing in float32: what is calibrated, evaluated and exported
    (a mixed-precision model is returned as a float32 twin; a float32 one as it is)."""
    if model.dtype_policy.name == "float32":
        return model
    twin = build_model(cfg, "float32")
    twin.set_weights(model.get_weights())
    return twin
