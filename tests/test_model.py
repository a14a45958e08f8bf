"""The network is the one the task prescribes: its layer names, ReLU, max-pooling, shapes and size."""

import argparse
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.config import Config, add_flags, from_args
from training.model import build_model
from training.train import SparseSmoothedCrossentropy, learning_rate_schedule

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
    # Every downsampling is max-pooling: the height and width of the feature maps change at its layers only,
    # and each of them halves them.
    def size(tensor) -> tuple[int, int]:
        return tuple(tensor.shape[1:3])

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or len(layer.output.shape) != 4:
            continue
        sizes = {size(t) for t in (layer.input if isinstance(layer.input, list) else [layer.input])}
        if isinstance(layer, keras.layers.MaxPooling2D):
            [(height, width)] = sizes
            assert size(layer.output) == (-(-height // 2), -(-width // 2)), layer.name
        else:
            assert sizes == {size(layer.output)}, layer.name
    [flatten] = [layer for layer in model.layers if isinstance(layer, keras.layers.Flatten)]
    assert max(size(flatten.input)) < 28  # and the network does downsample


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


def test_learning_rate_warms_up_step_by_step_then_decays_to_zero_at_the_last_step():
    cfg = Config(epochs=10, warmup_epochs=2, learning_rate=1e-3)
    schedule = learning_rate_schedule(cfg, steps_per_epoch=5)
    rates = [float(schedule(step)) for step in range(cfg.epochs * 5 + 1)]
    assert rates[0] == 0.0 and all(a < b for a, b in itertools.pairwise(rates[:11]))
    assert rates[10] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert rates[45] < 0.1 * cfg.learning_rate  # the last half epoch runs at under a tenth of the peak
    no_warmup = learning_rate_schedule(Config(epochs=4, warmup_epochs=0, learning_rate=1e-3), steps_per_epoch=3)
    assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(12)) == pytest.approx(0.0, abs=1e-12)


def test_label_smoothing_spreads_a_share_of_each_target_over_the_ten_classes():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    for smoothing in (0.0, 0.1):
        targets = np.full((6, 10), smoothing / 10) + np.eye(10)[labels] * (1 - smoothing)
        expected = -(targets * np.log(probabilities)).sum(axis=1).mean()
        loss = SparseSmoothedCrossentropy(smoothing)(labels[:, None], probabilities)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    restored = keras.losses.deserialize(keras.losses.serialize(SparseSmoothedCrossentropy(0.1)))
    assert restored.label_smoothing == 0.1


def test_fused_batch_norm_trains_exactly_as_keras_batch_norm():
    """The fused kernel is a speed-up, not another layer: outputs, gradients and moving statistics agree."""
    from training.model import FusedBatchNormalization

    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (16, 7, 7, 5)).astype(np.float32))
    keras_bn, fused_bn = keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)
    results = []
    for layer in (keras_bn, fused_bn):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5).astype(np.float32))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5).astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(1, 6, dtype=tf.float32))
        results.append((y, *tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]),
                        layer.moving_mean.numpy(), layer.moving_variance.numpy(), layer(x, training=False)))
    for expected, got in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
    assert not np.allclose(results[1][4], 0.0)  # the moving mean moved towards the batch's (about 2)


def test_a_mixed_precision_model_computes_in_bfloat16_and_its_float32_twin_agrees():
    from training.model import float32_copy

    cfg = Config()
    mixed = build_model(cfg, "mixed_bfloat16")
    assert mixed.get_layer("conv2_1").compute_dtype == "bfloat16"
    assert mixed.get_layer("conv2_1").kernel.dtype == "float32"  # the weights stay float32
    assert mixed.get_layer("output").compute_dtype == "float32"  # and so does the softmax
    twin = float32_copy(mixed, cfg)
    assert all(layer.compute_dtype == "float32" for layer in twin.layers)
    for a, b in zip(mixed.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(twin(x, training=False), mixed(x, training=False), atol=0.02)
    assert float32_copy(twin, cfg) is twin  # a float32 model is exported as it is


def test_auto_precision_follows_the_cpus_bfloat16_support(tmp_path):
    from training.model import cpu_has_bfloat16, resolve_precision

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_bfloat16(with_bf16) and not cpu_has_bfloat16(without)
    assert not cpu_has_bfloat16(tmp_path / "missing")
    assert resolve_precision("float32") == "float32" and resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert resolve_precision("auto") == ("mixed_bfloat16" if cpu_has_bfloat16() else "float32")


@pytest.mark.parametrize("name, good, bad", [("precision", "float32", "float16"), ("strategy", "mirrored", "tpu"),
                                             ("monitor", "val_accuracy", "val_acc")])
def test_a_flag_with_choices_accepts_only_them_when_parsed_and_in_code(name, good, bad):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    flag = "--" + name.replace("_", "-")
    assert getattr(from_args(parser.parse_args([flag, good])), name) == good
    with pytest.raises(SystemExit):  # argparse refuses it while parsing
        parser.parse_args([flag, bad])
    with pytest.raises(ValueError, match=f"{flag} must be one of .*, not '{bad}'"):
        Config(**{name: bad})


def test_the_output_dropout_is_a_share_of_the_dropout():
    model = build_model(Config(dropout=0.3, output_dropout_ratio=0.25))
    rates = [model.get_layer(f"dropout{i}").rate for i in (1, 2, 3)]
    assert rates == [0.3, 0.3, 0.3 * 0.25]
