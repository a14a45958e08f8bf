"""The one place that holds every hyperparameter and path of a training run.

Each field is a CLI flag of `python -m training.train` (`--batch-size` for `batch_size`); the defaults
are the ones the README's figures were measured with.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

MONITORS = ("val_loss", "val_accuracy")
PRECISIONS = ("auto", "mixed_bfloat16", "float32")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")


@dataclass
class Config:
    # Data.
    data_dir: str = field(default="data/tfds", metadata={"help": "tfds data dir (prepared offline if needed)"})
    validation_size: int = field(default=5000, metadata={"help": "training images held out for validation"})
    train_subset: int = field(default=0, metadata={"help": "use only the first N training images (0: all)"})
    test_subset: int = field(default=0, metadata={"help": "evaluate on the first N test images (0: all)"})
    shuffle_buffer: int = field(default=10_000, metadata={
        "help": "training images in the shuffle buffer, drawn from at random to make each batch"})

    # Network (the prescribed layers; sizes are ours).
    conv1_filters: int = 32
    conv2_filters: int = 48
    conv3_filters: int = 64
    conv1_kernel: int = 5
    branch1_kernel: int = field(default=3, metadata={"help": "kernel of conv2_1 and conv3_1"})
    branch2_kernel: int = field(default=3, metadata={"help": "kernel of conv2_2 and conv3_2"})
    fc1_units: int = 256
    fc2_units: int = 128
    dropout: float = field(default=0.15, metadata={"help": "dropout before fc1 and fc2"})
    output_dropout_ratio: float = field(default=0.5, metadata={
        "help": "dropout before the output layer, as a share of --dropout"})
    batch_norm: bool = field(default=True, metadata={
        "help": "batch normalisation after each convolution (with --ema its statistics are re-estimated for the "
                "averaged weights)"})
    batch_norm_batches: int = field(default=50, metadata={
        "help": "batches of clean training images that re-estimate the exported model's batch-norm statistics "
                "for the averaged weights (with --ema and --batch-norm)"})
    epoch_batch_norm_batches: int = field(default=10, metadata={
        "help": "the same before each epoch's validation: fewer, as they only have to rank the epochs"})
    weight_decay: float = field(default=1e-4, metadata={"help": "decoupled weight decay (AdamW)"})

    # Augmentation (training only).
    augment: bool = field(default=True, metadata={
        "help": "outlines, noise, random rotation, shear, shift, zoom, stroke width, occluding bars and strokes "
                "across training digits"})
    rotation_degrees: float = 15.0
    shear_fraction: float = 0.25
    shift_fraction: float = 0.1
    zoom_fraction: float = 0.15
    stroke_probability: float = field(default=0.2, metadata={
        "help": "share of training digits drawn --stroke-pixels thicker or thinner (half each)"})
    stroke_pixels: int = field(default=1, metadata={
        "help": "pixels a picked digit's strokes grow or shrink by on each side"})
    occlusion_probability: float = field(default=0.2, metadata={
        "help": "share of training digits with parallel bars erased out of them (what is left of a digit "
                "behind bars or after the serving graph removes ruled lines)"})
    occlusion_period_min: int = field(default=5, metadata={"help": "shortest period of the bars, in pixels"})
    occlusion_period_max: int = field(default=9, metadata={"help": "longest period of the bars, in pixels"})
    occlusion_width_min: int = field(default=1, metadata={"help": "narrowest bar, in pixels"})
    occlusion_width_max: int = field(default=2, metadata={"help": "widest bar, in pixels"})
    noise_probability: float = field(default=0.2, metadata={
        "help": "share of training digits given gaussian noise or salt and pepper, then normalised as the "
                "serving graph does"})
    noise_sigma_min: float = field(default=0.05, metadata={
        "help": "least standard deviation of the gaussian noise, as a share of the pixel range"})
    noise_sigma_max: float = field(default=0.3, metadata={
        "help": "greatest standard deviation of the gaussian noise, as a share of the pixel range"})
    impulse_min: float = field(default=0.01, metadata={
        "help": "least share of a noisy digit's pixels hit by salt and pepper"})
    impulse_max: float = field(default=0.25, metadata={
        "help": "greatest share of a noisy digit's pixels hit by salt and pepper"})
    line_probability: float = field(default=0.1, metadata={
        "help": "share of training digits with a straight stroke drawn across them (a pen slip, a crossed-out "
                "digit)"})
    line_width_min: float = field(default=1.0, metadata={"help": "narrowest stroke drawn across, in pixels"})
    line_width_max: float = field(default=2.5, metadata={"help": "widest stroke drawn across, in pixels"})
    outline_probability: float = field(default=0.05, metadata={
        "help": "share of training digits drawn as their outline (hollow strokes, as bubble writing)"})
    outline_pixels: int = field(default=1, metadata={"help": "width of the outline round the strokes, in pixels"})
    plain_epochs: int = field(default=0, metadata={
        "help": "the last N epochs augment geometrically only (rotation, shear, shift, zoom): no noise, outlines, "
                "stroke width, bars or lines while the rate is low"})

    # Optimisation.
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup_epochs: int = field(default=1, metadata={
        "help": "epochs of linear warm-up, step by step, before the cosine decay to 0 at the last step"})
    label_smoothing: float = field(default=0.1, metadata={
        "help": "share of each target spread evenly over the 10 classes"})
    monitor: str = field(default="val_loss", metadata={
        "choices": MONITORS,
        "help": "validation metric that picks the epoch saved as best.keras, a record of the run: what is "
                "exported is the model at the end of the schedule, whatever the validation noise"})
    ema: bool = field(default=True, metadata={
        "help": "validate, checkpoint and export an exponential moving average of the weights"})
    ema_momentum: float = field(default=0.999, metadata={
        "help": "the weight average's momentum once warm; at step t it is min(this, (1 + t) / (10 + t))"})

    # Speed.
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS,
        "help": "compute precision of training: mixed_bfloat16 computes in bfloat16 on float32 weights; auto picks "
                "it on CPUs with native bfloat16 (AVX512_BF16, AMX), else float32. The export is float32 either way"})

    steps_per_execution: int = field(default=8, metadata={
        "help": "train steps per call into TensorFlow: callbacks and the progress bar run between calls, so "
                "fewer calls leave the CPUs less idle between steps"})

    # Calibration.
    calibrate: bool = field(default=True, metadata={"help": "fit a softmax temperature on the validation split"})

    # Distribution.
    strategy: str = field(default="default", metadata={
        "choices": STRATEGIES,
        "help": "tf.distribute strategy: mirrored over all local devices, multi_worker over the hosts in "
                "$TF_CONFIG"})
    logical_cpus: int = field(default=0, metadata={
        "help": "split the CPU into N logical devices (to try mirrored without accelerators)"})

    # Reproducibility.
    seed: int = 42
    deterministic: bool = field(default=False, metadata={"help": "deterministic TF ops (slower)"})

    # Outputs.
    export_dir: str = field(default="models/mnist", metadata={"help": "base path; the model goes to <N>/"})
    run_dir: str = field(default="runs/mnist", metadata={"help": "checkpoints, backups, logs of the run"})
    reports_dir: str = field(default="reports", metadata={"help": "metrics.json and PNG plots"})
    verbose: int = field(default=1, metadata={"help": "Keras verbosity: 0 silent, 1 progress bar, 2 a line"})

    def __post_init__(self) -> None:
        """Refuses a value outside a field's declared choices, as the flag does: a Config built in code is
        checked too (a misspelt monitor would only warn in Keras, and nothing would be checkpointed)."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, defaults: Config | None = None) -> None:
    """Adds one flag per Config field; booleans get `--x` and `--no-x`."""
    defaults = defaults or Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(_flag(f.name), type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"))


def from_args(args: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
