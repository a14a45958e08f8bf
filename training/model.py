"""The prescribed network, in the Keras functional API with the task's layer names.

    input 28x28x1 -> conv1 -> pool1 -+-> conv2_1 -> pool2_1 -> conv3_1 -+-> conv3 (concatenate) -> pool3
                                     +-> conv2_2 -> pool2_2 -> conv3_2 -+
              -> flatten -> fc1 -> fc2 -> output (10, softmax)

Every nonlinearity is ReLU and every downsampling max-pooling. The two branches differ in kernel size,
so conv3 combines features seen at two scales.
"""

from __future__ import annotations

import keras
from keras import layers

from training.config import Config

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _conv(x, filters: int, kernel: int, name: str, cfg: Config):
    """Convolution -> (batch norm) -> ReLU; the activation layer carries the name when normalised."""
    if cfg.batch_norm:
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)
    return layers.Conv2D(filters, kernel, padding="same", activation="relu", name=name)(x)


def build_model(cfg: Config) -> keras.Model:
    """Returns the uncompiled classifier: float32 [N, 28, 28, 1] in [0, 1] -> softmax [N, 10]."""
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
    x = layers.Dropout(cfg.dropout / 2, name="dropout3")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")
