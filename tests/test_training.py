"""A tiny training run, end to end: callbacks, export, reload, predictions on PNG bytes, versions, resume."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
from tensorflow_serving.apis import prediction_log_pb2

from tests.conftest import tiny_config
from training import evaluate, export, preprocessing, samples, train
from training.config import Config
from training.model import build_model


def test_run_exports_version_1_with_metrics_reports_and_logs(trained, model_base_path):
    cfg = trained["cfg"]
    assert export.versions(model_base_path) == [1]
    assert not [p for p in model_base_path.iterdir() if p.name.startswith(".tmp")]
    published = json.loads((model_base_path / "1" / "assets.extra" / "metrics.json").read_text())
    assert published["test"]["examples"] == cfg.test_subset
    assert published["test"]["accuracy"] == trained["test"]["accuracy"] > 0.85
    assert published["config"]["train_subset"] == cfg.train_subset
    calibrated = published["calibration"]
    assert calibrated["temperature"] > 0
    card = (model_base_path / "1" / "assets.extra" / "model_card.md").read_text()
    assert card.startswith("# Model card: mnist, version 1")
    assert f"accuracy {100 * trained['test']['accuracy']:.2f}%" in card and "| 9 |" in card
    validation = calibrated["validation"]  # T minimises the validation NLL; T = 1 was a candidate
    assert validation["nll_after"] <= validation["nll_before"] + 1e-9
    assert 0 <= calibrated["test"]["ece_after"] <= 1
    reports = Path(cfg.reports_dir)
    assert json.loads((reports / "metrics.json").read_text())["export_path"] == str(model_base_path / "1")
    for png in ("training_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (reports / png).read_bytes().startswith(b"\x89PNG")
    run_dir = Path(cfg.run_dir)
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == cfg.epochs + 1 and "val_accuracy" in history[0]
    assert (run_dir / "best.keras").exists()
    assert any((run_dir / "tensorboard").iterdir())


def test_reloaded_model_reads_real_digits_from_png_bytes(model_base_path, mnist_png_bytes):
    loaded = tf.saved_model.load(str(model_base_path / "1"))
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([png for png, _ in mnist_png_bytes]))
    labels = np.array([label for _, label in mnist_png_bytes])
    digits = out["digit"].numpy()
    assert out["digit"].dtype == tf.int64 and out["probability"].dtype == tf.float32
    assert (digits == labels).mean() >= 0.85
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["probability"].numpy(), out["probabilities"].numpy().max(axis=1))
    np.testing.assert_array_equal(digits, out["probabilities"].numpy().argmax(axis=1))


def test_pixel_signature_agrees_with_the_bytes_signature(model_base_path, mnist_test_arrays):
    pngs = tf.constant(samples.encode_pngs(mnist_test_arrays[0][:16]))
    loaded = tf.saved_model.load(str(model_base_path / "1"))
    by_pixels = loaded.signatures["predict_pixels"](pixels=preprocessing.decode_batch(pngs))
    by_bytes = loaded.signatures["serving_default"](image_bytes=pngs)
    np.testing.assert_allclose(by_pixels["probabilities"], by_bytes["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(by_pixels["digit"], by_bytes["digit"])


def test_the_classification_signature_scores_what_the_default_signature_answers(model_base_path, mnist_test_arrays):
    pngs = samples.encode_pngs(mnist_test_arrays[0][:16])
    signatures = tf.saved_model.load(str(model_base_path / "1")).signatures
    examples = tf.constant([export.image_example(png).SerializeToString() for png in pngs])

    classified = signatures["classification"](inputs=examples)
    predicted = signatures["serving_default"](image_bytes=tf.constant(pngs))

    np.testing.assert_allclose(classified["scores"], predicted["probabilities"], atol=1e-6)
    assert classified["classes"].numpy().tolist() == [[str(d).encode() for d in range(10)]] * 16


def test_the_classification_signature_has_tf_servings_classify_method_and_a_valid_fingerprint(model_base_path):
    version = model_base_path / "1"
    graph = saved_model_pb2.SavedModel.FromString((version / "saved_model.pb").read_bytes()).meta_graphs[0]
    methods = {name: signature.method_name for name, signature in graph.signature_def.items()}
    assert methods["classification"] == "tensorflow/serving/classify"
    assert methods["serving_default"] == methods["predict_pixels"] == "tensorflow/serving/predict"
    assert sorted(graph.signature_def["classification"].inputs) == ["inputs"]
    assert sorted(graph.signature_def["classification"].outputs) == ["classes", "scores"]
    # The fingerprint hashes saved_model.pb: rewritten with it, it matches a fresh one.
    fingerprint = fingerprint_pb2.FingerprintDef.FromString((version / "fingerprint.pb").read_bytes())
    fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(version)))
    assert fingerprint.saved_model_checksum == fresh.saved_model_checksum


def test_every_signature_answers_a_call_of_no_images_with_no_outputs(model_base_path):
    """What TF Serving runs too: the network alone refuses an empty batch, the exported graph must not."""
    signatures = tf.saved_model.load(str(model_base_path / "1")).signatures
    for name, inputs in [("serving_default", {"image_bytes": tf.constant([], tf.string)}),
                         ("predict_pixels", {"pixels": tf.zeros([0, 28, 28, 1])})]:
        out = signatures[name](**inputs)
        assert out["digit"].shape == (0,) and out["digit"].dtype == tf.int64, name
        assert out["probability"].shape == (0,) and out["probabilities"].shape == (0, 10), name
    out = signatures["classification"](inputs=tf.constant([], tf.string))
    assert out["classes"].shape == (0, 10) and out["scores"].shape == (0, 10)


def test_warmup_file_holds_real_predict_and_classify_requests(model_base_path):
    path = model_base_path / "1" / "assets.extra" / export.WARMUP_FILE
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log", "predict_log", "classify_log"]
    assert [len(log.predict_log.request.inputs["image_bytes"].string_val) for log in logs[:2]] == [1, 8]
    request = logs[1].predict_log.request
    assert request.model_spec.name == "mnist" and request.model_spec.signature_name == "serving_default"
    assert all(b.startswith(b"\x89PNG") for b in request.inputs["image_bytes"].string_val)
    classify = logs[2].classify_log.request
    assert classify.model_spec.signature_name == "classification"
    assert [example.features.feature["image/encoded"].bytes_list.value[0] for example in
            classify.input.example_list.examples] == list(request.inputs["image_bytes"].string_val)


def test_saved_model_cli_lists_the_signatures(model_base_path):
    cli = [sys.executable, "-c", "from tensorflow.python.tools.saved_model_cli import main; main()"]
    shown = subprocess.run([*cli, "show", "--dir", str(model_base_path / "1"), "--all"],
                           capture_output=True, text=True, check=True).stdout
    for line in ("signature_def['serving_default']", "inputs['image_bytes'] tensor_info", "dtype: DT_STRING",
                 "outputs['digit'] tensor_info", "outputs['probability'] tensor_info",
                 "outputs['probabilities'] tensor_info", "signature_def['predict_pixels']",
                 "shape: (-1, 28, 28, 1)", "signature_def['classification']", "inputs['inputs'] tensor_info",
                 "outputs['classes'] tensor_info", "Method name is: tensorflow/serving/classify"):
        assert line in shown


def test_a_second_export_becomes_version_2_and_a_broken_one_none(copy_base, mnist_png_bytes, trained):
    base = copy_base()
    model = build_model(trained["cfg"])
    warmup = [png for png, _ in mnist_png_bytes[:2]]
    assert export.export_model(model, base, warmup, {"note": "second"}) == base / "2"
    assert export.versions(base) == [1, 2]
    assert json.loads((base / "2" / "assets.extra" / "metrics.json").read_text()) == {"note": "second"}
    assert "version 2" in (base / "2" / "assets.extra" / "model_card.md").read_text()
    with pytest.raises(tf.errors.InvalidArgumentError):
        export.export_model(model, base, [b"not an image"])  # fails its own check: no version 3
    assert export.versions(base) == [1, 2]
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]


class _Interrupt(keras.callbacks.Callback):
    """Stands for a killed process: raises after the given epoch has been backed up."""

    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt


class _EpochsSeen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, train_subset=512, validation_size=256, epochs=3, batch_size=128)
    with pytest.raises(KeyboardInterrupt):
        train.fit(cfg, [_Interrupt(after_epoch=1)])
    seen = _EpochsSeen()
    train.fit(cfg, [seen])
    assert seen.epochs == [2]
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]  # one log across both processes
    seen = _EpochsSeen()
    train.fit(cfg, [seen])  # a finished run leaves no backup: the next one starts afresh
    assert seen.epochs == [0, 1, 2]


def test_seeded_runs_are_reproducible(tmp_path, data_dir):
    weights = []
    for run in ("a", "b"):
        cfg = tiny_config(tmp_path / run, data_dir, train_subset=256, validation_size=128, epochs=1,
                          batch_size=64, deterministic=True, augment=True)
        weights.append(train.fit(cfg).get_layer("conv1").get_weights()[0])
    np.testing.assert_array_equal(weights[0], weights[1])


def test_with_ema_the_average_of_the_weights_is_validated_checkpointed_and_kept(tmp_path, data_dir):
    kernels, accuracy = {}, {}
    for ema in (False, True):
        # 16 steps with the default momentum: Keras's fixed 0.999 kept the average next to the initial weights
        cfg = tiny_config(tmp_path / f"ema_{ema}", data_dir, train_subset=512, validation_size=128, epochs=2,
                          batch_size=64, ema=ema, ema_momentum=0.999)
        model = train.fit(cfg)
        kernels[ema] = model.get_layer("conv1").get_weights()[0]
        accuracy[ema] = model.history.history["val_accuracy"][-1]
        if ema:  # the model ends holding the optimizer's average
            optimizer = model.optimizer
            index = optimizer._get_variable_index(model.get_layer("conv1").kernel)
            np.testing.assert_allclose(optimizer._model_variables_moving_average[index].numpy(), kernels[ema])
        saved = keras.models.load_model(Path(cfg.run_dir) / "best.keras")  # the best validated epoch, a record
        assert saved.get_layer("conv1").get_weights()[0].shape == kernels[ema].shape
    train.seed_everything(cfg)
    initial = build_model(cfg).get_layer("conv1").get_weights()[0]
    moved = {ema: float(np.abs(kernel - initial).mean()) for ema, kernel in kernels.items()}
    # the kept weights are the average: behind the raw weights, yet well away from where they started
    assert 0.5 * moved[False] < moved[True] < moved[False], moved
    assert accuracy[True] > accuracy[False] - 0.15, accuracy


def test_the_weight_average_warms_up_with_the_steps_taken():
    variable = keras.Variable(np.zeros(4, np.float32))
    optimizer = train.AdamWAverage(0.1, weight_decay=0.0, use_ema=True, ema_momentum=0.9)
    optimizer.build([variable])
    rng = np.random.default_rng(0)
    expected = None
    for step in range(40):
        optimizer.apply([keras.ops.convert_to_tensor(rng.normal(size=4).astype(np.float32))], [variable])
        weights = variable.numpy()
        momentum = 0.0 if step == 0 else min(0.9, (1 + step) / (10 + step))  # 0.9 from step 80 on: never here
        expected = weights if expected is None else momentum * expected + (1 - momentum) * weights
        np.testing.assert_allclose(optimizer._model_variables_moving_average[0].numpy(), expected, rtol=1e-5,
                                   atol=1e-6)
    # once warm, the cap holds: (1 + t) / (10 + t) passes 0.5 at step 8
    optimizer = train.AdamWAverage(0.1, weight_decay=0.0, use_ema=True, ema_momentum=0.5)
    optimizer.build([variable])
    optimizer.iterations.assign(100)
    before = optimizer._model_variables_moving_average[0].numpy()
    optimizer.apply([keras.ops.ones(4)], [variable])
    np.testing.assert_allclose(optimizer._model_variables_moving_average[0].numpy(),
                               0.5 * before + 0.5 * variable.numpy(), rtol=1e-5)


def test_evaluate_cli_reports_on_the_newest_version(model_base_path, data_dir, tmp_path, capsys):
    evaluate.main(["--model", str(model_base_path), "--data-dir", data_dir, "--reports-dir", str(tmp_path),
                   "--test-subset", "100"])
    assert "accuracy" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["examples"] == 100 and metrics["model"].endswith("/1")


def test_classification_metrics_on_known_answers():
    probabilities = np.eye(10, dtype=np.float32)[[0, 1, 2, 2]]
    metrics = evaluate.classification_metrics(probabilities, np.array([0, 1, 2, 3]))
    assert metrics["accuracy"] == 0.75 and metrics["errors"] == 1
    assert metrics["per_class"]["2"] == {"precision": 0.5, "recall": 1.0, "support": 1}
    assert metrics["per_class"]["3"]["recall"] == 0.0
    assert metrics["confusion_matrix"][3][2] == 1


def test_mirrored_strategy_over_two_logical_cpus_trains_and_exports(tmp_path, data_dir):
    """In a process of its own: logical devices must be set before TensorFlow starts its runtime."""
    args = ["--data-dir", data_dir, "--strategy", "mirrored", "--logical-cpus", "2", "--train-subset", "1024",
            "--validation-size", "256", "--test-subset", "64", "--epochs", "1", "--batch-size", "128",
            "--conv1-filters", "4", "--conv2-filters", "4", "--conv3-filters", "4", "--fc1-units", "16",
            "--fc2-units", "16", "--no-augment", "--verbose", "0", "--export-dir", str(tmp_path / "models"),
            "--run-dir", str(tmp_path / "run"), "--reports-dir", str(tmp_path / "reports")]
    done = subprocess.run([sys.executable, "-m", "training.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 replica(s) (MirroredStrategy)" in done.stdout
    assert export.versions(tmp_path / "models") == [1]


def test_only_the_chief_of_a_cluster_exports(monkeypatch):
    for task, chief in [(None, True), ({"type": "chief", "index": 0}, True), ({"type": "worker", "index": 0}, True),
                        ({"type": "worker", "index": 1}, False), ({"type": "evaluator", "index": 0}, False)]:
        if task is None:
            monkeypatch.delenv("TF_CONFIG", raising=False)
        else:
            monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}, "task": task}))
        assert train.is_chief() is chief, task
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not train.is_chief()  # worker 0 is not the chief of a cluster that names one


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="--strategy must be one of"):
        train.make_strategy(tiny_config(Path("/nonexistent"), "", strategy="tpu"))


def test_an_unknown_monitor_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--monitor must be one of val_loss, val_accuracy, not 'val_acc'"):
        train.fit(tiny_config(tmp_path, "", monitor="val_acc"))


def test_with_ema_and_batch_norm_the_statistics_belong_to_the_averaged_weights(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, train_subset=512, validation_size=128, epochs=2, batch_size=64,
                      ema=True, ema_momentum=0.99, batch_norm=True)
    model = train.fit(cfg)
    images = np.concatenate(list(train.clean_training_images(cfg).as_numpy_iterator()))
    for name in ("conv1_bn", "conv3_2_bn"):
        layer = model.get_layer(name)
        activations = keras.Model(model.input, layer.input).predict(images, verbose=0).astype(np.float64)
        mean, variance = layer.get_weights()[2:]  # gamma, beta, moving mean, moving variance
        # what this image set gives through the weights the model holds, not the raw weights' running average
        # (deeper layers differ slightly: while re-estimating, the layers before them normalise by batch)
        np.testing.assert_allclose(mean, activations.mean(axis=(0, 1, 2)), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(variance, activations.var(axis=(0, 1, 2)), rtol=0.05, atol=1e-4)


def _compiled_step(optimizer, variable):
    return tf.function(lambda gradient: optimizer.apply([gradient], [variable]))


def test_the_fused_adam_update_is_keras_adamw_arithmetic():
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(5, 3)).astype(np.float32)
    gradients = [tf.constant(rng.normal(size=(5, 3)).astype(np.float32)) for _ in range(30)]
    weights = []
    for optimizer_class in (keras.optimizers.AdamW, train.AdamWAverage):
        variable = keras.Variable(initial.copy())
        optimizer = optimizer_class(learning_rate=0.01, weight_decay=0.01)
        optimizer.build([variable])
        step = _compiled_step(optimizer, variable)
        for gradient in gradients:
            step(gradient)
        weights.append(variable.numpy())
    assert np.abs(weights[0] - initial).max() > 0.1
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-5, atol=1e-5)


def test_several_steps_per_call_still_take_every_batch_once(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, train_subset=512, validation_size=128, epochs=2, batch_size=64,
                      steps_per_execution=3)  # 8 batches an epoch: calls of 3, 3 and 2
    model = train.fit(cfg)
    assert int(model.optimizer.iterations.numpy()) == 2 * 8
    assert len(model.history.history["loss"]) == 2


def test_a_mixed_precision_run_exports_a_float32_model(tmp_path, data_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    cfg = tiny_config(tmp_path, data_dir, train_subset=2048, validation_size=128, test_subset=200, epochs=2,
                      batch_size=64, precision="mixed_bfloat16", batch_norm=True, ema=True)
    metrics = train.run(cfg)
    assert metrics["config"]["precision"] == metrics["training_precision"] == "mixed_bfloat16"
    card = (Path(metrics["export_path"]) / "assets.extra" / "model_card.md").read_text()
    assert "trained in mixed_bfloat16; the export computes in float32" in card
    saved = saved_model_pb2.SavedModel.FromString((Path(metrics["export_path"]) / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    dtypes = {value.type for node in nodes for value in node.attr.values() if value.type}
    assert tf.float32.as_datatype_enum in dtypes and tf.bfloat16.as_datatype_enum not in dtypes
    assert metrics["test"]["accuracy"] > 0.8  # the twin carries the trained weights and statistics


def test_a_run_always_finishes_its_schedule_and_keeps_its_last_weights(tmp_path, data_dir):
    """A learning rate this high makes the validation loss worse after the first epoch: early stopping
    (patience 5 at 466d904) once ended a default run while its rate was two thirds of its peak."""
    cfg = tiny_config(tmp_path, data_dir, train_subset=512, validation_size=128, epochs=8, batch_size=64,
                      learning_rate=0.05, warmup_epochs=0, ema=False)
    model = train.fit(cfg)
    history = model.history.history
    rates = history["learning_rate"]
    assert len(rates) == cfg.epochs and not model.stop_training
    assert rates[0] > 0.9 * cfg.learning_rate and rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert int(np.argmin(history["val_loss"])) < cfg.epochs - 6  # patience 5 would have stopped it
    _, accuracy = model.evaluate(train.data.pipeline(train.data.load_split(cfg, "validation"), cfg, training=False),
                                 verbose=0)
    assert accuracy == pytest.approx(history["val_accuracy"][-1], abs=1e-6)  # the last epoch's weights, kept


def _card(**settings) -> str:
    from training import model_card

    return model_card.render({"config": Config(**settings).to_dict()}, 1)


def test_the_model_card_states_the_augmentation_the_run_used():
    from training import model_card

    default = model_card.augmentation(Config())
    assert "noise" in default and "outline" in default and "rotation ±15°" in default
    noiseless = model_card.augmentation(Config(noise_probability=0.0))
    assert "noise" not in noiseless and "rotation ±15°" in noiseless
    turned = model_card.augmentation(Config(rotation_degrees=7.5, impulse_max=0.4, line_probability=0.0))
    assert "rotation ±7.5°" in turned and "±15°" not in turned and "40% of the pixels" in turned
    assert "stroke drawn across" in default and "stroke drawn across" not in turned
    still = Config(rotation_degrees=0, shear_fraction=0, shift_fraction=0, zoom_fraction=0)
    assert "affine" not in model_card.augmentations(still)
    assert not any(word in model_card.augmentation(still) for word in ("rotation", "shear", "shift", "zoom"))
    assert model_card.augmentations(Config(augment=False)) == {}
    assert "Augmentation: none." in _card(augment=False)


def test_the_model_card_lists_the_augmentations_in_the_order_the_pipeline_applies_them(monkeypatch):
    from training import data, model_card

    kinds = {"random_outline": "outline", "random_noise": "noise", "random_affine": "affine",
             "random_stroke_width": "stroke_width", "random_occlusion": "occlusion", "random_line": "line"}
    applied = []
    for function, kind in kinds.items():
        monkeypatch.setattr(data, function, lambda images, *args, kind=kind, **kwargs: applied.append(kind) or images)
    data.augmenter(Config())(tf.zeros([2, 28, 28, 1]))
    assert list(model_card.augmentations(Config())) == applied == list(kinds.values())


def test_the_model_card_states_the_plain_finish_only_when_it_turns_something_off():
    from training import model_card

    assert "in the last 8 epochs the affine map only" in model_card.augmentation(Config(epochs=40, plain_epochs=8))
    assert "last" not in model_card.augmentation(Config(plain_epochs=0))
    geometric_only = Config(plain_epochs=8, outline_probability=0, noise_probability=0, stroke_probability=0,
                            occlusion_probability=0, line_probability=0)
    assert "last" not in model_card.augmentation(geometric_only)
    all_plain = model_card.augmentations(Config(epochs=5, plain_epochs=5))  # the others never applied
    assert list(all_plain) == ["affine"]


def test_the_model_card_says_when_batch_norm_and_the_weight_average_were_used():
    assert "batch normalisation" in _card(batch_norm=True) and "batch normalisation" not in _card(batch_norm=False)
    averaged = _card(ema=True, ema_momentum=0.995, batch_norm=True)
    assert "moving average" in averaged and "0.995" in averaged and "batch-norm statistics re-estimated" in averaged
    assert "re-estimated" not in _card(ema=True, batch_norm=False)
    plain = _card(ema=False, ema_momentum=0.995)
    assert "moving average" not in plain and "0.995" not in plain and "last training step" in plain


def test_the_model_card_takes_its_numbers_from_the_code(monkeypatch):
    from training import calibration, mnist, model_card

    monkeypatch.setattr(calibration, "ECE_BINS", 23)
    monkeypatch.setattr(preprocessing, "MAX_SIDE", 1234)
    monkeypatch.setattr(mnist, "TRAIN_SIZE", 70_000)
    metrics = {"config": Config().to_dict(), "calibration": {"temperature": 1.5, "test": {}}}
    card = model_card.render(metrics, 1)
    assert "ECE (23 bins)" in card and "15 bins" not in card
    assert "1234 pixels a side" in card and "4096" not in card
    assert "of the 70,000 training images" in card
    assert "not published" in model_card.render({}, 1)  # no config: no settings claimed


def test_the_plain_finish_turns_the_other_augmentations_off_for_the_last_epochs_even_after_a_resume(
        tmp_path, data_dir):
    share = tf.Variable(1.0)
    finish = train.PlainFinish(share, Config(epochs=5, plain_epochs=2))
    seen = []
    for epoch in (0, 1, 2, 3, 4, 2):  # the last: a run resumed at epoch 2 after a kill in the plain finish
        finish.on_epoch_begin(epoch)
        seen.append(float(share.numpy()))
    assert seen == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    cfg = tiny_config(tmp_path, data_dir, train_subset=256, validation_size=128, epochs=2, batch_size=64,
                      augment=True, plain_epochs=1)
    assert len(train.fit(cfg).history.history["loss"]) == 2
