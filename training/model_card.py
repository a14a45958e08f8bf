"""The model card written beside every export (`assets.extra/model_card.md`): what the model is, what it
was trained and measured on, what it is for and where it fails. Figures come from the export's metrics."""

from __future__ import annotations

import datetime
from typing import Any


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def augmentation(cfg: dict[str, Any]) -> str:
    """The training augmentation as the config set it, each kind with its strength; kinds set to 0 left out."""
    if not cfg.get("augment"):
        return "none"
    kinds = [
        ("noise_probability", lambda c: f"gaussian noise or salt and pepper (up to {c.get('impulse_max', 0):.0%} of "
                                        f"the pixels) on {c['noise_probability']:.0%} of digits, read back "
                                        "through the serving graph"),
        ("outline_probability", lambda c: f"hollow outlines on {c['outline_probability']:.0%}"),
        ("rotation_degrees", lambda c: f"rotation ±{c['rotation_degrees']:g}°"),
        ("shear_fraction", lambda c: f"shear ±{c['shear_fraction']:g}"),
        ("shift_fraction", lambda c: f"shift ±{c['shift_fraction']:.0%}"),
        ("zoom_fraction", lambda c: f"zoom ±{c['zoom_fraction']:.0%}"),
        ("stroke_probability", lambda c: f"strokes 1 px thicker or thinner on {c['stroke_probability']:.0%}"),
        ("occlusion_probability", lambda c: f"occluding bars on {c['occlusion_probability']:.0%}"),
        ("line_probability", lambda c: f"a straight stroke across on {c['line_probability']:.0%}"),
    ]
    text = "; ".join(text(cfg) for key, text in kinds if cfg.get(key, 0) > 0) or "none"
    if cfg.get("plain_epochs", 0) > 0 and text != "none":
        text += f"; the last {cfg['plain_epochs']} epochs geometric only (rotation, shear, shift, zoom)"
    return text


def render(metrics: dict[str, Any], version: int, model_name: str = "mnist") -> str:
    cfg = metrics.get("config", {})
    test = metrics.get("test", {})
    calibration = metrics.get("calibration") or {}
    per_class = test.get("per_class", {})
    rows = "\n".join(f"| {d} | {_percent(v['precision'])} | {_percent(v['recall'])} | {v['support']} |"
                     for d, v in sorted(per_class.items()))
    calibration_text = "not calibrated (temperature 1)"
    if calibration:
        after = calibration.get("test", calibration.get("validation", {}))
        calibration_text = (f"temperature {calibration['temperature']:.3f} fitted on the validation split; "
                            f"test ECE (15 bins) {_percent(after.get('ece_before'))} before, "
                            f"{_percent(after.get('ece_after'))} after")
    subset = f"the first {_count(cfg['train_subset'])}" if cfg.get("train_subset") else "all"
    return f"""# Model card: {model_name}, version {version}

Exported {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")} with TensorFlow \
{metrics.get("tensorflow", "?")}, Keras {metrics.get("keras", "?")}.

## What it is

A convolutional network that reads one handwritten digit (0-9) from an image file. The SavedModel's
`serving_default` signature takes the encoded bytes (PNG, JPEG, GIF, BMP, WebP; any size; grey, RGB or RGBA) and
returns `digit`, `probability` and all ten `probabilities`. Decoding and normalisation (polarity, contrast,
cropping to the ink, MNIST's 20x20 box centred by centre of mass in 28x28) run inside the graph.

Network: conv1 ({cfg.get("conv1_filters")} filters) -> conv2_1 | conv2_2 ({cfg.get("conv2_filters")} each)
-> conv3_1 | conv3_2 ({cfg.get("conv3_filters")} each) combined as conv3 -> fc1 ({cfg.get("fc1_units")}) -> fc2
({cfg.get("fc2_units")}) -> output (10); ReLU, max-pooling, dropout {cfg.get("dropout")}.

## Data

MNIST through tensorflow-datasets (`mnist` 3.0.1): {subset} of the 60,000 training images less the last
{_count(cfg.get("validation_size"))} held out for validation (monitoring, calibration); the
10,000 test images only for the figures below. Augmentation: {augmentation(cfg)}.
{cfg.get("epochs")} epochs, batch {cfg.get("batch_size")}, label smoothing {cfg.get("label_smoothing", 0)}, \
seed {cfg.get("seed")}, batch norm {cfg.get("batch_norm")},
weight average {cfg.get("ema")}, trained in {metrics.get("training_precision", "float32")}; the export computes in \
float32.

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
- Images declaring more than 4096 pixels a side, and GIFs whose frames hold more than 4096x4096 pixels in
  all, are refused before decoding.
"""
