"""Exports a trained classifier as the next version of a TF Serving model: `<base>/<N>/`.

The SavedModel carries two signatures:

- `serving_default`: `image_bytes` (string [None], encoded image files) -> `digit` (int64 [None]),
  `probability` (float32 [None]), `probabilities` (float32 [None, 10]); decoding runs in the graph
  (`training.preprocessing`), so TF Serving needs nothing else;
- `predict_pixels`: `pixels` (float32 [None, 28, 28, 1] in [0, 1], white on black) -> the same outputs;
- `classification` (method `tensorflow/serving/classify`, for TF Serving's Classify, MultiInference and REST
  `:classify`): `inputs` (string [None], serialized tf.Example with the image file's bytes in the feature
  `image/encoded`) -> `classes` (string [None, 10], "0".."9") and `scores` (float32 [None, 10]), the layout
  TF Serving's classifier requires (tensorflow_serving/servables/tensorflow/classifier.cc).

A call of no images answers outputs of no rows in all three.

Beside it, `assets.extra/` holds TF Serving's warmup file (real PredictRequests it replays on load),
`metrics.json` and `model_card.md`, so a model's figures and limits travel with it. The version is written
into a hidden temporary directory and renamed into place only when complete and verified: a server polling
the base path never sees half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from training import model_card
from training.calibration import scale_probabilities
from training.model import NUM_CLASSES
from training.preprocessing import IMAGE_SIZE, decode_images

CLASSIFY_SIGNATURE = "classification"
CLASSIFY_METHOD = "tensorflow/serving/classify"  # signature_constants.CLASSIFY_METHOD_NAME
IMAGE_FEATURE = "image/encoded"  # the tf.Example feature holding the image file, as TFRecord datasets name it
CLASS_LABELS = tuple(str(digit) for digit in range(NUM_CLASSES))
WARMUP_FILE = "tf_serving_warmup_requests"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "model_card.md"


def prediction_outputs(probabilities: tf.Tensor) -> dict[str, tf.Tensor]:
    return {
        "digit": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        "probability": tf.reduce_max(probabilities, axis=-1),
        "probabilities": probabilities,
    }


def versions(base_path: str | Path) -> list[int]:
    """The version directories under a base path, as TF Serving reads them: names of ASCII digits only ("²" and
    "٣" are digits to str.isdigit, not to TF Serving). serving/models.py has its own reader: the trainer and
    the server share the layout, not code."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def next_version(base_path: str | Path) -> int:
    return max(versions(base_path), default=0) + 1


def image_example(image: bytes) -> tf.train.Example:
    """What the classification signature reads: one image file's bytes in the feature `image/encoded`."""
    return tf.train.Example(features=tf.train.Features(feature={
        IMAGE_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}))


def write_warmup(export_path: Path, model_name: str, images: list[bytes]) -> None:
    """TF Serving replays these requests when it loads the version, before it serves traffic: Predict with one
    image and with a batch, and Classify with a batch, so that no signature is traced on a user's request."""
    from tensorflow_serving.apis import classification_pb2, model_pb2, predict_pb2, prediction_log_pb2

    assets = export_path / "assets.extra"
    assets.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(assets / WARMUP_FILE)) as writer:
        for batch in ([images[0]], images):  # one single-image request and one batch
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
        classify = classification_pb2.ClassificationRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=CLASSIFY_SIGNATURE))
        classify.input.example_list.examples.extend(image_example(image) for image in images)
        log = prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify))
        writer.write(log.SerializeToString())


def build_archive(model: keras.Model, temperature: float = 1.0) -> keras.export.ExportArchive:
    """Both signatures; `temperature` (training.calibration) is folded into their probabilities."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def from_pixels(pixels):
        # A call of no images answers no outputs: the network itself refuses an empty batch (TF 2.21's fused
        # convolution, batch norm and ReLU says "input depth must be evenly divisible by filter depth: 1 vs 32").
        probabilities = tf.cond(tf.shape(pixels)[0] > 0, lambda: model(pixels, training=False),
                                lambda: tf.zeros([0, NUM_CLASSES], tf.float32))
        if temperature != 1.0:
            probabilities = scale_probabilities(probabilities, temperature)
        return prediction_outputs(probabilities)

    def from_bytes(image_bytes):
        return from_pixels(decode_images(image_bytes))

    def from_examples(inputs):
        features = tf.io.parse_example(inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
        scores = from_bytes(features[IMAGE_FEATURE])["probabilities"]
        classes = tf.tile(tf.constant([CLASS_LABELS]), [tf.shape(scores)[0], 1])
        return {"classes": classes, "scores": scores}

    archive.add_endpoint("serving_default", from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("predict_pixels", from_pixels,
                         input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32,
                                                        name="pixels")])
    archive.add_endpoint(CLASSIFY_SIGNATURE, from_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    return archive


def set_method_names(path: Path, methods: dict[str, str]) -> None:
    """Keras exports every signature with the predict method; TF Serving's Classify wants its own. Rewrites
    saved_model.pb with the given signatures' method names, and fingerprint.pb, which hashes it."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    graph_file = path / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(graph_file.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        for name, method in methods.items():
            meta_graph.signature_def[name].method_name = method
    graph_file.write_bytes(saved_model.SerializeToString(deterministic=True))
    (path / "fingerprint.pb").write_bytes(fingerprinting.CreateFingerprintDef(str(path)))


def stage(model: keras.Model, base_path: str | Path, warmup_images: list[bytes], model_name: str = "mnist",
          temperature: float = 1.0) -> Path:
    """Writes and verifies the SavedModel in a hidden directory of `base_path` (TF Serving only looks at
    numeric names) and returns it; `publish` gives it its version."""
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    staged = base / f".tmp-export-{uuid.uuid4().hex}"
    try:
        build_archive(model, temperature).write_out(str(staged), verbose=False)
        set_method_names(staged, {CLASSIFY_SIGNATURE: CLASSIFY_METHOD})
        write_warmup(staged, model_name, warmup_images)
        check_export(staged, warmup_images)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def publish(staged: Path, metrics: dict[str, Any] | None = None, model_name: str = "mnist") -> Path:
    """Adds metrics.json and the model card, and renames the staged export to the next free version,
    atomically."""
    (staged / "assets.extra" / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=2) + "\n")
    base = staged.parent
    while True:
        target = base / str(next_version(base))
        (staged / "assets.extra" / MODEL_CARD_FILE).write_text(model_card.render(metrics or {}, int(target.name),
                                                                                  model_name))
        try:
            os.rename(staged, target)  # atomic on one file system; fails if the target appeared meanwhile
            return target
        except OSError:
            if not target.exists():
                raise


def export_model(model: keras.Model, base_path: str | Path, warmup_images: list[bytes],
                 metrics: dict[str, Any] | None = None, model_name: str = "mnist", temperature: float = 1.0) -> Path:
    """Writes the next version under `base_path` atomically and returns its path."""
    return publish(stage(model, base_path, warmup_images, model_name, temperature), metrics, model_name)


def check_export(path: Path, images: list[bytes]) -> None:
    """Loads the SavedModel back and runs its default and classification signatures once: a broken export never
    gets a version, nor one whose two signatures disagree."""
    signatures = tf.saved_model.load(str(path)).signatures
    out = signatures["serving_default"](image_bytes=tf.constant(images))
    if out["probabilities"].shape != (len(images), 10):
        raise RuntimeError(f"exported signature returned probabilities of shape {out['probabilities'].shape}")
    examples = tf.constant([image_example(image).SerializeToString() for image in images])
    scores = signatures[CLASSIFY_SIGNATURE](inputs=examples)["scores"]
    if scores.shape != out["probabilities"].shape or float(tf.reduce_max(tf.abs(scores - out["probabilities"]))) > 1e-5:
        raise RuntimeError("the classification signature's scores differ from serving_default's probabilities")
