"""Robustness report: how an exported model reads digits that are not MNIST's clean 28x28 scans.

Every variant of the test set goes through the model's `serving_default` signature as encoded image
bytes, the way users and TF Serving send them:

- `clean`: the test digits as 28x28 PNG (what `training.evaluate` measures);
- corruptions of the 28x28 digits, each at one fixed severity that keeps a digit legible to a person,
  sent as 28x28 PNG (see CORRUPTIONS for the severities);
- the test digits rendered as real-world files: black ink on white paper, enlarged to several sizes, as
  grey, RGB and RGBA (transparent paper) PNG and as JPEG, some placed off-centre on a larger page;
- MNIST-C (Mu and Gilmer 2019, `training.mnist_c`): its 15 corruptions at the published severity, sent as
  28x28 PNG. Families whose kind of change training's augmentation applied to this model are marked
  (`seen_in_training`, from the config published with the export) and kept apart: the figure that
  counts is the mean over the families training never saw.

Everything is deterministic: random choices (signs, noise, positions) come from generators seeded by SEED,
the variant's name and the batch (for MNIST-C, each batch of BATCH_SIZE digits is corrupted with a seed drawn
from that generator). An image the model refuses (for example "no ink found") counts as
wrong and is reported as refused. Outputs in the reports directory (OUTPUTS): `robustness.json`,
`robustness.png` (accuracy per variant, with lines at CORRUPTION_FLOOR and CORRUPTION_MEAN_TARGET),
`robustness_examples.png` (a few digits per variant: the file as sent, and the 28x28 the model sees after the
in-graph preprocessing), `mnist_c.png` (accuracy per MNIST-C corruption, seen and unseen families apart) and
`mnist_c_contact_sheet.png` (the first test digits under each MNIST-C corruption).

Run it with `python -m training.evaluate --model models/mnist --robustness [--test-subset N]`.
"""

from __future__ import annotations

import io
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, ImageFilter

from training import mnist_c, plots, samples
from training.mnist_c import SEED  # one seed for every corrupted test set
from training.model import NUM_CLASSES
from training.preprocessing import decode_images

BATCH_SIZE = 256
CENTRE = 14.0  # of a 28x28 image, in PIL's continuous coordinates

# Severities: one fixed level per corruption, legible to a person.
ROTATION_DEGREES = 20.0  # each digit turned by +20 or -20 degrees
SHEAR = 0.3  # horizontal shear, +0.3 or -0.3
SCALE_DOWN, SCALE_UP = 0.7, 1.3  # about the image centre
TRANSLATION = 4  # pixels, in x and in y, each +4 or -4
NOISE_SIGMA = 0.2  # of the full range
IMPULSE_FRACTION = 0.05  # pixels set to black or white
BLUR_RADIUS = 1.0  # PIL's GaussianBlur radius (the standard deviation)
MOTION_PIXELS = 5  # horizontal box blur
CONTRAST = 0.3  # the range squeezed to 30% around mid-grey
STRIPE_WIDTH, STRIPE_PERIOD, STRIPE_LEVEL = 2, 7, 51  # 2 px rows every 7 px, 20% grey, painted over

# The targets `summarize` checks: clean accuracy, the mean over the corruptions above and the floor no corruption
# may fall below, how far below clean a real-world file may read ...
CLEAN_TARGET = 0.995
CORRUPTION_MEAN_TARGET = 0.97
CORRUPTION_FLOOR = 0.90
FILE_TOLERANCE = 0.003
# ... and MNIST-C's mean, over all its corruptions and over the families training did not see.
MNIST_C_TARGET = 0.97

# What the report writes into the reports directory.
REPORT_JSON, ACCURACY_PLOT, EXAMPLES_PLOT = "robustness.json", "robustness.png", "robustness_examples.png"
MNIST_C_PLOT, MNIST_C_SHEET = "mnist_c.png", "mnist_c_contact_sheet.png"
OUTPUTS = (REPORT_JSON, ACCURACY_PLOT, EXAMPLES_PLOT, MNIST_C_PLOT, MNIST_C_SHEET)

# MNIST-C families and the augmentation settings (Config fields) that apply their kind of change to training
# digits (training.data.augmenter). Which families a model saw is read from the training config published
# with it (assets.extra/metrics.json); the others are unseen, and their mean is the figure that counts.
MNIST_C_AUGMENTATIONS = {
    "shot_noise": ("noise_probability", "noise augmentation (gaussian noise)"),
    "impulse_noise": ("noise_probability", "noise augmentation (salt and pepper)"),
    "shear": ("shear_fraction", "affine augmentation (shear)"),
    "scale": ("zoom_fraction", "affine augmentation (zoom)"),
    "rotate": ("rotation_degrees", "affine augmentation (rotation)"),
    "translate": ("shift_fraction", "affine augmentation (shift)"),
    "dotted_line": ("line_probability", "line augmentation (straight strokes across the digit)"),
    "zigzag": ("line_probability", "line augmentation (straight strokes across the digit)"),
    "canny_edges": ("outline_probability", "outline augmentation (hollow digits)"),
}


def seen_in_training(config: dict[str, Any]) -> dict[str, str]:
    """{MNIST-C family: the augmentation that applies it} for a model trained with `config` (Config as a dict).
    A setting the config does not hold did not exist when the model was trained: not applied. An empty config
    (a model published without one) counts as having seen every family it could have, so an unknown model is
    never credited with robustness to what it may have trained on."""
    if not config:
        return {name: text for name, (_, text) in MNIST_C_AUGMENTATIONS.items()}
    if not config.get("augment", True):
        return {}
    return {name: text for name, (setting, text) in MNIST_C_AUGMENTATIONS.items() if config.get(setting, 0) > 0}


def training_config(export_path: str | Path) -> dict[str, Any]:
    """The training config published with an export ({} if it has none)."""
    metrics = Path(export_path) / "assets.extra" / "metrics.json"
    return json.loads(metrics.read_text()).get("config", {}) if metrics.exists() else {}


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # "clean", "corruption", "file" or "mnist_c"
    description: str
    files: Callable[[np.ndarray, np.random.Generator], list[bytes]]  # uint8 [n, 28, 28, 1] -> encoded files
    seen_in_training: str | None = None  # the augmentation that applies this kind of change, if any


# --- corruptions of the uint8 28x28 digits (white on black) --------------------------------------

def _map_pil(images: np.ndarray, transform: Callable[[Image.Image, Any], Image.Image], params=None) -> np.ndarray:
    """Applies a PIL transform to each uint8 [28, 28, 1] image, with one parameter per image."""
    params = [None] * len(images) if params is None else params
    out = [np.asarray(transform(Image.fromarray(image[:, :, 0]), p)) for image, p in zip(images, params)]
    return np.stack(out)[..., None].astype(np.uint8)


def _affine(image: Image.Image, matrix: tuple[float, ...], resample=Image.Resampling.BILINEAR) -> Image.Image:
    """PIL's affine transform; `matrix` maps output coordinates to input coordinates."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=0)


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], n)


def rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angles = _signs(rng, len(images)) * ROTATION_DEGREES
    return _map_pil(images, lambda im, a: im.rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=0), angles)


def shear(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amounts = _signs(rng, len(images)) * SHEAR
    return _map_pil(images, lambda im, s: _affine(im, (1, s, -s * CENTRE, 0, 1, 0)), amounts)


def scale(factor: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    inverse = 1.0 / factor
    offset = CENTRE * (1.0 - inverse)
    return lambda images, rng: _map_pil(images, lambda im, _: _affine(im, (inverse, 0, offset, 0, inverse, offset)))


def translate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shifts = (rng.choice([-1, 1], (len(images), 2)) * TRANSLATION).tolist()
    return _map_pil(images, lambda im, d: _affine(im, (1, 0, -d[0], 0, 1, -d[1]), Image.Resampling.NEAREST), shifts)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(images + rng.normal(0.0, NOISE_SIGMA * 255, images.shape))


def impulse_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(images.shape) < IMPULSE_FRACTION
    return np.where(hit, rng.choice(np.array([0, 255], np.uint8), images.shape), images)


def gaussian_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _map_pil(images, lambda im, _: im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)))


def motion_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A horizontal box blur of MOTION_PIXELS, as a camera moving sideways."""
    half = MOTION_PIXELS // 2
    padded = np.pad(images.astype(np.float32), ((0, 0), (0, 0), (half, half), (0, 0)))
    width = images.shape[2]
    return _to_uint8(sum(padded[:, :, i:i + width] for i in range(MOTION_PIXELS)) / MOTION_PIXELS)


def thicker(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _map_pil(images, lambda im, _: im.filter(ImageFilter.MaxFilter(3)))


def _erode_half_pixel(image: Image.Image, _) -> Image.Image:
    big = image.resize((2 * image.width, 2 * image.height), Image.Resampling.BILINEAR)
    return big.filter(ImageFilter.MinFilter(3)).resize(image.size, Image.Resampling.BOX)


def thinner(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Erosion by half a pixel on each side (a 3x3 minimum filter at twice the resolution). A 3x3 minimum
    filter at 28x28 leaves a fifth of the ink: MNIST's strokes are 2-3 px wide, and 2s, 6s and 8s vanish."""
    return _map_pil(images, _erode_half_pixel)


def low_contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(127.5 + (images.astype(np.float32) - 127.5) * CONTRAST)


def stripes(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    rows = np.arange(images.shape[1]) % STRIPE_PERIOD < STRIPE_WIDTH
    out[:, rows] = STRIPE_LEVEL
    return out


def invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - images


CORRUPTIONS: dict[str, tuple[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]] = {
    "rotation": (f"rotated by ±{ROTATION_DEGREES:g}° (sign random per digit)", rotate),
    "shear": (f"horizontal shear ±{SHEAR:g}", shear),
    "scale_down": (f"scaled by {SCALE_DOWN:g} about the centre", scale(SCALE_DOWN)),
    "scale_up": (f"scaled by {SCALE_UP:g} about the centre (edges may be cut)", scale(SCALE_UP)),
    "translation": (f"shifted by ±{TRANSLATION} px in x and y (edges may be cut)", translate),
    "gaussian_noise": (f"gaussian noise, sigma {NOISE_SIGMA:g} of the range", gaussian_noise),
    "impulse_noise": (f"salt and pepper on {IMPULSE_FRACTION:.0%} of the pixels", impulse_noise),
    "gaussian_blur": (f"gaussian blur, radius {BLUR_RADIUS:g} px", gaussian_blur),
    "motion_blur": (f"horizontal motion blur over {MOTION_PIXELS} px", motion_blur),
    "thicker": ("strokes dilated by 1 px (3x3 maximum filter)", thicker),
    "thinner": ("strokes eroded by 1/2 px a side (3x3 minimum filter at 2x)", thinner),
    "low_contrast": (f"range squeezed to {CONTRAST:.0%} around mid-grey", low_contrast),
    "stripes": (f"{STRIPE_WIDTH} px rows every {STRIPE_PERIOD} px painted {STRIPE_LEVEL / 255:.0%} grey", stripes),
    "inverted": ("black digit on white", invert),
}


# --- the test digits as real-world files (black ink on white paper) ------------------------------

def _paper(image: np.ndarray, size: int) -> Image.Image:
    """Black ink on white paper, enlarged to size x size."""
    return Image.fromarray(255 - image[:, :, 0]).resize((size, size), Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {"compress_level": 1}))
    return buffer.getvalue()


def _on_page(digit: Image.Image, page: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The digit pasted at a random place of a white page of `page` (width, height)."""
    canvas = Image.new(digit.mode, page, 255)
    x = int(rng.integers(0, page[0] - digit.width + 1))
    y = int(rng.integers(0, page[1] - digit.height + 1))
    canvas.paste(digit, (x, y))
    return canvas


def _rgba(paper: Image.Image) -> Image.Image:
    """Black ink whose opacity is its darkness, on transparent paper."""
    ink = Image.eval(paper, lambda v: 255 - v)
    black = Image.new("L", paper.size, 0)
    return Image.merge("RGBA", (black, black, black, ink))


def rendering(size: int, fmt: str = "PNG", mode: str = "L", page: tuple[int, int] | None = None):
    def files(images: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        out = []
        for image in images:
            paper = _paper(image, size)
            if page is not None:
                paper = _on_page(paper, page, rng)
            paper = _rgba(paper) if mode == "RGBA" else paper.convert(mode)
            out.append(_encode(paper, fmt))
        return out
    return files


RENDERINGS: dict[str, tuple[str, Callable[[np.ndarray, np.random.Generator], list[bytes]]]] = {
    "file_png_grey_28": ("grey PNG, 28x28", rendering(28)),
    "file_png_grey_56": ("grey PNG, 56x56", rendering(56)),
    "file_png_grey_112": ("grey PNG, 112x112", rendering(112)),
    "file_png_grey_600": ("grey PNG, 600x600", rendering(600)),
    "file_png_rgb_112": ("RGB PNG, 112x112", rendering(112, mode="RGB")),
    "file_png_rgba_280": ("RGBA PNG, 280x280, transparent paper", rendering(280, mode="RGBA")),
    "file_jpeg_56": ("JPEG quality 85, 56x56", rendering(56, "JPEG")),
    "file_jpeg_rgb_page_800x600": ("RGB JPEG quality 85, 200 px digit off-centre on an 800x600 page",
                                   rendering(200, "JPEG", "RGB", page=(800, 600))),
}


def _as_pngs(corrupt: Callable[[np.ndarray, np.random.Generator], np.ndarray]):
    return lambda images, rng: samples.encode_pngs(corrupt(images, rng))


def _mnist_c_files(name: str) -> Callable[[np.ndarray, np.random.Generator], list[bytes]]:
    return lambda images, rng: samples.encode_pngs(mnist_c.corrupt(name, images, seed=int(rng.integers(2**31))))


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].rstrip(".") if text else ""


def variants(seen: dict[str, str] | None = None) -> list[Variant]:
    """Every variant of the report, clean first; `seen` marks the MNIST-C families training saw (default: all
    that the augmentation can apply)."""
    seen = seen_in_training({}) if seen is None else seen
    out = [Variant("clean", "clean", "the test digits as 28x28 PNG", lambda images, rng: samples.encode_pngs(images))]
    out += [Variant(name, "corruption", text, _as_pngs(fn)) for name, (text, fn) in CORRUPTIONS.items()]
    out += [Variant(name, "file", text, fn) for name, (text, fn) in RENDERINGS.items()]
    out += [Variant(f"mnist_c_{name}", "mnist_c", _first_line(fn.__doc__), _mnist_c_files(name),
                    seen.get(name)) for name, fn in mnist_c.CORRUPTIONS.items()]
    return out


# --- evaluation ----------------------------------------------------------------------------------

def predict_files(signature, files: list[bytes]) -> np.ndarray:
    """Predicted digits; -1 for images the signature refuses (a refused image fails its whole batch, so
    a failing batch is split until the refused images are alone)."""
    try:
        return signature(image_bytes=tf.constant(files))["digit"].numpy()
    except tf.errors.InvalidArgumentError:
        if len(files) == 1:
            return np.array([-1])
        half = len(files) // 2
        return np.concatenate([predict_files(signature, files[:half]), predict_files(signature, files[half:])])


def _rng(variant: Variant, start: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(variant.name.encode()), start])


def evaluate_variant(signature, variant: Variant, images: np.ndarray, seed: int = SEED,
                     keep: int = BATCH_SIZE) -> tuple[np.ndarray, list[bytes], float]:
    """(predicted digits, the first `keep` files sent, seconds) for one variant of the images."""
    start_time = time.monotonic()
    predicted, kept = [], []
    for start in range(0, len(images), BATCH_SIZE):
        files = variant.files(images[start:start + BATCH_SIZE], _rng(variant, start, seed))
        predicted.append(predict_files(signature, files))
        kept += files[:max(0, keep - start)]
    return np.concatenate(predicted), kept, time.monotonic() - start_time


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures and which of its targets (CLEAN_TARGET ... MNIST_C_TARGET) they meet."""
    clean = next(r["accuracy"] for r in results if r["group"] == "clean")
    corruptions = {r["name"]: r["accuracy"] for r in results if r["group"] == "corruption"}
    files = {r["name"]: r["accuracy"] for r in results if r["group"] == "file"}
    mean = _mean(corruptions.values())
    below = sorted(name for name, acc in corruptions.items() if acc < CORRUPTION_FLOOR)
    off = sorted(name for name, acc in files.items() if acc < clean - FILE_TOLERANCE)
    summary = {
        "clean_accuracy": clean,
        "corruption_mean_accuracy": mean,
        "corruption_min": min(corruptions.items(), key=lambda kv: kv[1]) if corruptions else None,
        "file_min": min(files.items(), key=lambda kv: kv[1]) if files else None,
        "criteria": {
            f"clean accuracy >= {CLEAN_TARGET}": clean >= CLEAN_TARGET,
            f"corruption mean >= {CORRUPTION_MEAN_TARGET}": mean >= CORRUPTION_MEAN_TARGET,
            f"no corruption below {CORRUPTION_FLOOR} (unless illegible: see the examples)": not below,
            f"every file within {FILE_TOLERANCE} of clean": not off,
        },
        "corruptions_below_floor": below,
        "files_below_clean": off,
    }
    mnist_c_results = [r for r in results if r["group"] == "mnist_c"]
    if mnist_c_results:
        overall = _mean(r["accuracy"] for r in mnist_c_results)
        unseen = _mean(r["accuracy"] for r in mnist_c_results if not r.get("seen_in_training"))
        seen = _mean(r["accuracy"] for r in mnist_c_results if r.get("seen_in_training"))
        summary |= {"mnist_c_mean_accuracy": overall, "mnist_c_unseen_mean_accuracy": unseen,
                    "mnist_c_seen_mean_accuracy": seen,
                    "mnist_c_min": min(((r["name"], r["accuracy"]) for r in mnist_c_results), key=lambda kv: kv[1])}
        summary["criteria"] |= {
            f"MNIST-C mean >= {MNIST_C_TARGET}": overall >= MNIST_C_TARGET,
            f"MNIST-C mean over the families training did not see >= {MNIST_C_TARGET}": unseen >= MNIST_C_TARGET,
        }
    return summary


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def robustness_report(export_path: str | Path, images: np.ndarray, labels: np.ndarray,
                      reports_dir: str | Path, seed: int = SEED, log: Callable[[str], None] | None = None) -> dict:
    """Measures every variant through the serving signature and writes OUTPUTS into `reports_dir`."""
    log = log or (lambda message: print(message, flush=True))
    loaded = tf.saved_model.load(str(export_path))
    signature = loaded.signatures["serving_default"]
    examples = example_indices(labels)
    results, shown = [], {}
    seen = seen_in_training(training_config(export_path))
    for variant in variants(seen):
        predicted, files, seconds = evaluate_variant(signature, variant, images, seed, keep=max(examples) + 1)
        accuracy = float((predicted == labels).mean())
        results.append({"name": variant.name, "group": variant.group, "description": variant.description,
                        "seen_in_training": variant.seen_in_training, "accuracy": accuracy,
                        "errors": int((predicted != labels).sum()),
                        "refused": int((predicted < 0).sum()), "seconds": round(seconds, 2)})
        shown[variant.name] = ([files[i] for i in examples], predicted[examples])
        log(f"[robustness] {variant.name:<28} {accuracy:.4f}  ({seconds:.1f} s)")
    clean = results[0]["accuracy"]
    for r in results:
        r["delta"] = r["accuracy"] - clean
    report = {"model": str(export_path), "examples": len(labels), "seed": seed,
              "mnist_c_seen_in_training": seen,
              "input": "encoded files through the serving_default signature",
              "summary": summarize(results), "variants": results}
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    plot_accuracies(results, reports / ACCURACY_PLOT)
    plot_examples(shown, labels[examples], results, reports / EXAMPLES_PLOT)
    plot_mnist_c(results, reports / MNIST_C_PLOT)
    mnist_c.contact_sheet(images, reports / MNIST_C_SHEET, seed)
    return report


def example_indices(labels: np.ndarray, count: int = NUM_CLASSES) -> list[int]:
    """The first test digit of each class (the first digits if some class is missing)."""
    first = sorted(int(np.flatnonzero(labels == d)[0]) for d in range(NUM_CLASSES) if (labels == d).any())
    extra = [i for i in range(len(labels)) if i not in first]
    return sorted((first + extra)[:count])


def format_table(report: dict) -> str:
    lines = [f"{'variant':<28} {'group':<10} {'accuracy':>8} {'delta':>8} {'refused':>7}"]
    for r in report["variants"]:
        lines.append(f"{r['name']:<28} {r['group']:<10} {r['accuracy']:>8.4f} {r['delta'] * 100:>+7.2f}p"
                     f" {r['refused']:>7}")
    summary = report["summary"]
    lines.append(f"mean over corruptions: {summary['corruption_mean_accuracy']:.4f}")
    if "mnist_c_mean_accuracy" in summary:
        lines.append(f"MNIST-C mean: {summary['mnist_c_mean_accuracy']:.4f} over all {len(mnist_c.CORRUPTIONS)}, "
                     f"{summary['mnist_c_unseen_mean_accuracy']:.4f} over the families training did not see, "
                     f"{summary['mnist_c_seen_mean_accuracy']:.4f} over those it saw "
                     f"({', '.join(report.get('mnist_c_seen_in_training', {})) or 'none'})")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in summary["criteria"].items()]
    if summary["corruptions_below_floor"]:
        lines.append("corruptions below the floor: " + ", ".join(summary["corruptions_below_floor"]))
    if summary["files_below_clean"]:
        lines.append("files below clean: " + ", ".join(summary["files_below_clean"]))
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------

GROUP_COLOURS = {"clean": "tab:green", "corruption": "tab:blue", "file": "tab:orange", "mnist_c": "tab:purple"}


def plot_accuracies(results: list[dict[str, Any]], out: Path) -> None:
    plt = plots.pyplot()
    names = [r["name"] for r in results]
    accuracies = [r["accuracy"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(results) + 1.5))
    ax.barh(names, accuracies, color=[GROUP_COLOURS[r["group"]] for r in results])
    for y, acc in enumerate(accuracies):
        ax.text(acc, y, f" {acc:.4f}", va="center", fontsize=7)
    ax.axvline(CORRUPTION_FLOOR, color="red", linestyle="--", label=f"{CORRUPTION_FLOOR:.0%} floor")
    ax.axvline(CORRUPTION_MEAN_TARGET, color="black", linestyle=":", label=f"{CORRUPTION_MEAN_TARGET:.0%} mean target")
    ax.set_xlim(min(0.8, min(accuracies) - 0.02), 1.005)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (files through serving_default)")
    ax.set_title("robustness: clean (green), corruptions (blue), real-world files (orange), MNIST-C (purple)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    plots.save(fig, out)


def plot_mnist_c(results: list[dict[str, Any]], out: Path) -> None:
    """Accuracy per MNIST-C corruption: families training never saw in blue, those it saw in grey, with
    MNIST_C_TARGET and the mean over the unseen families."""
    plt = plots.pyplot()
    rows = [r for r in results if r["group"] == "mnist_c"]
    if not rows:
        return
    names = [r["name"].removeprefix("mnist_c_") + (" (seen)" if r["seen_in_training"] else "") for r in rows]
    accuracies = [r["accuracy"] for r in rows]
    unseen = _mean(r["accuracy"] for r in rows if not r["seen_in_training"])
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(names, accuracies, color=["tab:gray" if r["seen_in_training"] else "tab:blue" for r in rows])
    for y, acc in enumerate(accuracies):
        ax.text(acc, y, f" {acc:.4f}", va="center", fontsize=7)
    ax.axvline(MNIST_C_TARGET, color="black", linestyle=":", label=f"{MNIST_C_TARGET:.0%} target")
    ax.axvline(unseen, color="tab:blue", linestyle="--", label=f"mean over unseen families {unseen:.4f}")
    ax.set_xlim(max(0.0, min(accuracies) - 0.05), 1.005)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (28x28 PNG through serving_default)")
    ax.set_title("MNIST-C: families training never saw (blue), seen by its augmentation (grey)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    plots.save(fig, out)


CELL, GAP = 56, 4  # pixels of one example in the grid, and between examples


def model_inputs(files: list[bytes]) -> list[np.ndarray | None]:
    """The normalised 28x28 images the model receives for these files (None for a refused file)."""
    try:
        return list(decode_images(tf.constant(files)).numpy()[..., 0])
    except tf.errors.InvalidArgumentError:
        return [model_inputs([file])[0] if len(files) > 1 else None for file in files]


def _as_sent(file: bytes) -> np.ndarray:
    """The file as a person sees it: transparency over white, grey, fitted into CELL x CELL."""
    image = Image.open(io.BytesIO(file)).convert("RGBA")
    paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
    grey = Image.alpha_composite(paper, image).convert("L")
    factor = CELL / max(grey.size)
    size = (max(1, round(grey.width * factor)), max(1, round(grey.height * factor)))
    grey = grey.resize(size, Image.Resampling.NEAREST if factor > 1 else Image.Resampling.LANCZOS)
    cell = Image.new("L", (CELL, CELL), 128)
    cell.paste(grey, ((CELL - grey.width) // 2, (CELL - grey.height) // 2))
    return np.asarray(cell, np.float32) / 255.0


def _as_seen(normalised: np.ndarray | None) -> np.ndarray:
    if normalised is None:
        return np.full((CELL, CELL), 0.5, np.float32)
    return np.kron(normalised, np.ones((CELL // 28, CELL // 28), np.float32))


def plot_examples(shown: dict[str, tuple[list[bytes], np.ndarray]], labels: np.ndarray,
                  results: list[dict[str, Any]], out: Path) -> None:
    """One row per variant; per example the file as sent (left) and the 28x28 the model sees after the
    in-graph preprocessing (right, with the prediction beneath: red when wrong)."""
    plt = plots.pyplot()
    accuracy = {r["name"]: r["accuracy"] for r in results}
    count, step = len(labels), CELL + GAP
    mosaic = np.ones((len(shown) * (step + 12), count * (2 * CELL + 2 * GAP)), np.float32)
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 80 + 1.6, mosaic.shape[0] / 80 + 0.4))
    for row, (name, (files, predicted)) in enumerate(shown.items()):
        top = row * (step + 12)
        for k, (file, seen, label, digit) in enumerate(zip(files, model_inputs(files), labels, predicted)):
            left = k * (2 * CELL + 2 * GAP)
            mosaic[top:top + CELL, left:left + CELL] = _as_sent(file)
            mosaic[top:top + CELL, left + CELL + 1:left + 2 * CELL + 1] = _as_seen(seen)
            ax.text(left + 1.5 * CELL, top + CELL + 2, "refused" if digit < 0 else str(digit), fontsize=6,
                    ha="center", va="top", color="black" if digit == label else "red")
        ax.text(-6, top + CELL / 2, f"{name}\n{accuracy[name]:.4f}", fontsize=7, ha="right", va="center")
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title("robustness examples: file as sent | what the model sees (prediction; red = wrong)", fontsize=9)
    fig.subplots_adjust(left=1.5 / fig.get_figwidth(), right=0.995, top=1 - 0.3 / fig.get_figheight(), bottom=0)
    plots.save(fig, out, dpi=80)
