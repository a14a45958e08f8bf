"""The model card written beside every export (`assets.extra/model_card.md`): what the model is, what it
was trained and measured on, what it is for and where it fails.

Every fact in it is read, not retyped: the run's settings from its Config (published in the export's metrics as
`config`), the figures from those metrics, and the numbers the code works with (the calibration's bins, the
graph's limits and sizes, the dataset's) from the constants that define them. A setting the run turned off is
not mentioned.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from training import calibration, mnist, preprocessing
from training.config import Config
from training.model import NUM_CLASSES


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _share(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def run_config(metrics: dict[str, Any]) -> Config | None:
    """The run's Config from the metrics published with an export; None when they hold none."""
    published = metrics.get("config")
    if not published:
        return None
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{name: value for name, value in published.items() if name in names})


def augmentations(cfg: Config) -> dict[str, str]:
    """{kind: what it did} for each augmentation the run applied, in the order `training.data.augmenter` applies
    them. Kinds set to 0 are left out, and so is everything when `augment` is off. The affine map is one
    resampling whatever its parts; the other kinds are the ones the plain finish turns off, so a finish as long
    as the run means they never applied."""
    if not cfg.augment:
        return {}
    affine = [text for amount, text in [
        (cfg.rotation_degrees, f"rotation ±{cfg.rotation_degrees:g}°"),
        (cfg.shear_fraction, f"shear ±{cfg.shear_fraction:g}"),
        (cfg.shift_fraction, f"shift ±{_share(cfg.shift_fraction)}"),
        (cfg.zoom_fraction, f"zoom ±{_share(cfg.zoom_fraction)}"),
    ] if amount > 0]
    shared = cfg.plain_epochs < cfg.epochs  # some epoch applies the non-geometric kinds
    steps = [
        ("outline", shared and cfg.outline_probability > 0,
         f"{_share(cfg.outline_probability)} of the digits drawn as hollow outlines"),
        ("noise", shared and cfg.noise_probability > 0,
         f"gaussian noise or salt and pepper (on up to {_share(cfg.impulse_max)} of the pixels) on "
         f"{_share(cfg.noise_probability)} of the digits, then normalised as the serving graph normalises a file"),
        ("affine", bool(affine), ", ".join(affine)),
        ("stroke_width", shared and cfg.stroke_probability > 0,
         f"strokes 1 px thicker or thinner on {_share(cfg.stroke_probability)}"),
        ("occlusion", shared and cfg.occlusion_probability > 0,
         f"bars erased out of {_share(cfg.occlusion_probability)}"),
        ("line", shared and cfg.line_probability > 0,
         f"a straight stroke drawn across {_share(cfg.line_probability)}"),
    ]
    return {kind: text for kind, applied, text in steps if applied}


def augmentation(cfg: Config) -> str:
    """The augmentation of the run in one sentence: `augmentations` in order, then the plain finish if it
    changed anything."""
    applied = augmentations(cfg)
    if not applied:
        return "none"
    text = "; ".join(applied.values())
    plain = min(cfg.plain_epochs, cfg.epochs)
    if 0 < plain < cfg.epochs and set(applied) - {"affine"}:
        text += f"; in the last {plain} epochs " + ("the affine map only" if "affine" in applied else "none of it")
    return text


def _network(cfg: Config) -> str:
    after = "batch normalisation and ReLU" if cfg.batch_norm else "ReLU"
    return (f"conv1 ({cfg.conv1_filters} filters) -> conv2_1 | conv2_2 ({cfg.conv2_filters} each) -> conv3_1 | "
            f"conv3_2 ({cfg.conv3_filters} each) combined as conv3 -> fc1 ({cfg.fc1_units}) -> fc2 ({cfg.fc2_units}) "
            f"-> output ({NUM_CLASSES}); each convolution followed by {after}; max-pooling, dropout {cfg.dropout:g}.")


def _weights(cfg: Config) -> str:
    if not cfg.ema:
        return "The exported weights are those of the last training step."
    statistics = ", with the batch-norm statistics re-estimated for the averaged weights" if cfg.batch_norm else ""
    return (f"The exported weights are an exponential moving average of the training weights (momentum "
            f"{cfg.ema_momentum:g} once warm){statistics}.")


def _data(cfg: Config | None, metrics: dict[str, Any]) -> str:
    if cfg is None:
        return "The training configuration was not published with this export."
    subset = f"the first {_count(cfg.train_subset)}" if cfg.train_subset else "all"
    test = (f"the first {_count(cfg.test_subset)} of the {_count(mnist.TEST_SIZE)}" if cfg.test_subset
            else f"the {_count(mnist.TEST_SIZE)}")
    return f"""MNIST through tensorflow-datasets (`{mnist.NAME}` {mnist.VERSION}): {subset} of the \
{_count(mnist.TRAIN_SIZE)} training images less the last {_count(cfg.validation_size)} held out for validation
(monitoring, calibration); {test} test images only for the figures below. Augmentation: {augmentation(cfg)}.
{cfg.epochs} epochs, batch {cfg.batch_size}, peak learning rate {cfg.learning_rate:g}, weight decay \
{cfg.weight_decay:g}, label smoothing {cfg.label_smoothing:g}, seed {cfg.seed}; trained in \
{metrics.get("training_precision", "float32")}; the export computes in float32. {_weights(cfg)}"""


def render(metrics: dict[str, Any], version: int, model_name: str = "mnist") -> str:
    cfg = run_config(metrics)
    test = metrics.get("test", {})
    calibration_figures = metrics.get("calibration") or {}
    per_class = test.get("per_class", {})
    rows = "\n".join(f"| {d} | {_percent(v['precision'])} | {_percent(v['recall'])} | {v['support']} |"
                     for d, v in sorted(per_class.items()))
    calibration_text = "not calibrated (temperature 1)"
    if calibration_figures:
        after = calibration_figures.get("test", calibration_figures.get("validation", {}))
        calibration_text = (f"temperature {calibration_figures['temperature']:.3f} fitted on the validation split; "
                            f"test ECE ({calibration.ECE_BINS} bins) {_percent(after.get('ece_before'))} before, "
                            f"{_percent(after.get('ece_after'))} after")
    network = _network(cfg) if cfg else "(sizes not published with this export)"
    box, size, side = preprocessing.DIGIT_BOX, preprocessing.IMAGE_SIZE, preprocessing.MAX_SIDE
    call_pixels = preprocessing.MAX_CALL_PIXELS
    return f"""# Model card: {model_name}, version {version}

Exported {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")} with TensorFlow \
{metrics.get("tensorflow", "?")}, Keras {metrics.get("keras", "?")}.

## What it is

A convolutional network that reads one handwritten digit (0-9) from an image file. The SavedModel's
`serving_default` signature takes the encoded bytes (PNG, JPEG, GIF, BMP, WebP; any size; grey, RGB or RGBA) and
returns `digit`, `probability` and all ten `probabilities`. Decoding and normalisation (polarity, contrast,
cropping to the ink, MNIST's {box}x{box} box centred by centre of mass in {size}x{size}) run inside the graph.

Network: {network}

## Data

{_data(cfg, metrics)}

## Figures (test set, each image sent as PNG bytes through the serving signature)

- accuracy {_percent(test.get("accuracy"))} ({test.get("errors", "?")} errors in {test.get("examples", "?")}),
  loss {test.get("loss", float("nan")):.4f}
- calibration: {calibration_text}

| digit | precision | recall | support |
| --- | --- | --- | --- |
{rows}

## Intended use

Reading single handwritten digits: forms, demos, teaching, a baseline for digit recognition services.
Not for multi-digit numbers, letters, printed text, or decisions that need a guarantee: check the
probability and send doubtful cases to a person.

## Limits

- Trained on MNIST only: American census staff and students' digits, scanned, white on black. Digits written
  in other styles (a crossed 7, a 1 with a long flag), photographed in poor light or on patterned paper are
  read less well than the figures above say; the probabilities are calibrated on MNIST, not on them.
- One digit per image: an image with several digits or other marks is read as one digit, whatever it shows.
- An image without ink (blank, or with too little contrast) is refused with INVALID_ARGUMENT, not guessed.
- Images declaring more than {side} pixels a side, GIFs whose frames hold more than {side}x{side} pixels in
  all, and requests whose images declare more than {call_pixels:,} pixels together are refused before decoding.
"""
