"""The network is the one the task prescribes: its layer names, ReLU, max-pooling, shapes and size."""

import argparse
import itertools

import keras
import numpy as np
import pytest

from training.config import Config, add_flags, from_args
from training.model import build_model
from training.train import learning_rate_at

PRESCRIBED = ["conv1", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3", "fc1", "fc2", "output"]


@pytest.fixture(scope="module")
def model():
    return build_model(Config())


def test_prescribed_layer_names_and_kinds(model):
    names = [layer.name for layer in model.layers]
    for name in PRESCRIBED:
        assert name in names
    for name in ["conv1", "conv2_1", "conv2_2", "conv3_1", "conv3_2"]:
        assert isinstance(model.get_layer(name), keras.layers.Conv2D)
    assert isinstance(model.get_layer("conv3"), keras.layers.Concatenate)
    for name in ["fc1", "fc2", "output"]:
        assert isinstance(model.get_layer(name), keras.layers.Dense)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_conv3_combines_the_two_branches(batch_norm):
    model = build_model(Config(batch_norm=batch_norm))
    conv3 = model.get_layer("conv3")
    sources = {node.operation.name for node in conv3._inbound_nodes[0].parent_nodes}
    suffix = "_relu" if batch_norm else ""
    assert sources == {f"conv3_1{suffix}", f"conv3_2{suffix}"}
    assert conv3.output.shape[-1] == 2 * Config().conv3_filters


@pytest.mark.parametrize("batch_norm", [False, True])
def test_relu_everywhere_and_max_pooling_for_downsampling(batch_norm):
    model = build_model(Config(batch_norm=batch_norm))
    convs = ["conv1", "conv2_1", "conv2_2", "conv3_1", "conv3_2"]
    for name in convs:
        conv = model.get_layer(name)
        assert tuple(conv.strides) == (1, 1)  # no strided downsampling
        if batch_norm:  # conv -> batch norm -> ReLU layer
            assert isinstance(model.get_layer(f"{name}_relu"), keras.layers.ReLU)
        else:
            assert conv.activation is keras.activations.relu
    assert model.get_layer("fc1").activation is keras.activations.relu
    assert model.get_layer("fc2").activation is keras.activations.relu
    assert model.get_layer("output").activation is keras.activations.softmax
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 4
    assert not [layer for layer in model.layers if "pool" in layer.name and layer not in pools]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_shapes_and_parameter_count(batch_norm):
    cfg = Config(batch_norm=batch_norm)
    model = build_model(cfg)
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    assert model.get_layer("conv3").output.shape[1:3] == (7, 7)

    def conv(k, cin, cout):  # weights and biases, or weights and batch norm's scale, offset, mean, variance
        return k * k * cin * cout + (4 * cout if batch_norm else cout)

    f1, f2, f3 = cfg.conv1_filters, cfg.conv2_filters, cfg.conv3_filters
    expected = (conv(cfg.conv1_kernel, 1, f1)
                + conv(cfg.branch1_kernel, f1, f2) + conv(cfg.branch2_kernel, f1, f2)
                + conv(cfg.branch1_kernel, f2, f3) + conv(cfg.branch2_kernel, f2, f3)
                + (4 * 4 * 2 * f3 + 1) * cfg.fc1_units + (cfg.fc1_units + 1) * cfg.fc2_units
                + (cfg.fc2_units + 1) * 10)
    assert model.count_params() == expected


def test_output_is_a_probability_distribution(model):
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    p = np.asarray(model(x, training=False))
    assert p.shape == (3, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_every_config_field_is_a_flag():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    cfg = from_args(parser.parse_args(["--epochs", "3", "--no-augment", "--learning-rate", "0.01",
                                       "--export-dir", "x/y"]))
    assert (cfg.epochs, cfg.augment, cfg.learning_rate, cfg.export_dir) == (3, False, 0.01, "x/y")
    assert from_args(parser.parse_args([])) == Config()


def test_learning_rate_warms_up_then_decays():
    cfg = Config(epochs=10, warmup_epochs=2, learning_rate=1e-3)
    rates = [learning_rate_at(e, cfg) for e in range(cfg.epochs)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(rates[2:]))
    assert rates[-1] < 0.05e-3
