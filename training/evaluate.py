"""Evaluation of an exported model the way clients use it: PNG bytes through its serving signature.

Writes `metrics.json` and PNG plots (training curves, confusion matrix, misclassified digits) into a
reports directory. `python -m training.evaluate --model models/mnist` evaluates the newest exported version
on the MNIST test set without training anything; with `--robustness` it writes the robustness report of
`training.robustness` instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from training import data, plots, robustness, samples
from training.config import Config
from training.export import versions
from training.model import NUM_CLASSES


def predict_bytes(signature, images: list[bytes], batch_size: int = 256) -> np.ndarray:
    """Probabilities [N, 10] from a `serving_default` signature fed encoded images."""
    out = [signature(image_bytes=tf.constant(images[i:i + batch_size]))["probabilities"].numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES), np.float32)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, loss, per-class precision and recall, and the confusion matrix (rows: true digit)."""
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positive = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(true_positive / confusion.sum(axis=0))
        recall = np.nan_to_num(true_positive / confusion.sum(axis=1))
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "examples": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "errors": int((predicted != labels).sum()),
        "per_class": {str(d): {"precision": float(precision[d]), "recall": float(recall[d]),
                               "support": int(confusion[d].sum())} for d in range(NUM_CLASSES)},
        "confusion_matrix": confusion.tolist(),
    }


def load_test_arrays(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for x, y in data.load_split(cfg, "test").batch(1024):
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def evaluate_export(export_path: str | Path, images: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Metrics of an exported version on uint8 test images sent as PNG bytes; also returns probabilities."""
    signature = tf.saved_model.load(str(export_path)).signatures["serving_default"]
    pngs = samples.encode_pngs(images)
    start = time.monotonic()
    probabilities = predict_bytes(signature, pngs)
    metrics = classification_metrics(probabilities, labels)
    metrics["seconds"] = round(time.monotonic() - start, 2)
    metrics["input"] = "PNG bytes through the serving_default signature"
    return metrics, probabilities


# --- plots ---------------------------------------------------------------------------------------

def plot_history(history_csv: Path, out: Path) -> None:
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    plt = plots.pyplot()
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [float(r[key]) for r in rows], label="training")
        if f"val_{key}" in rows[0]:
            ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    plots.save(fig, out)


def plot_confusion(confusion: list[list[int]], out: Path) -> None:
    plt = plots.pyplot()
    matrix = np.array(confusion)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = np.where(np.eye(NUM_CLASSES, dtype=bool), 0, matrix)  # colour the errors, not the diagonal
    im = ax.imshow(shown, cmap="Reds")
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if i != j else "tab:blue")
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title("confusion matrix (test set; colour = errors)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    plots.save(fig, out)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, out: Path,
                       limit: int = 48) -> None:
    plt = plots.pyplot()
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)[:limit]
    cols = 8
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i, :, :, 0], cmap="gray")
        ax.set_title(f"{labels[i]}→{predicted[i]} ({probabilities[i, predicted[i]]:.2f})", fontsize=8)
    fig.suptitle(f"misclassified test digits: true→predicted (probability), {len(wrong)} shown")
    fig.tight_layout()
    plots.save(fig, out)


def write_reports(reports_dir: str | Path, metrics: dict, images: np.ndarray, labels: np.ndarray,
                  probabilities: np.ndarray, history_csv: Path | None = None) -> Path:
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if history_csv is not None and history_csv.exists():
        plot_history(history_csv, reports / "training_curves.png")
    plot_confusion(metrics["test"]["confusion_matrix"], reports / "confusion_matrix.png")
    plot_misclassified(images, labels, probabilities, reports / "misclassified.png")
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=Config.export_dir, help="a version dir, or a base path (newest)")
    parser.add_argument("--data-dir", default=Config.data_dir)
    parser.add_argument("--reports-dir", default=Config.reports_dir)
    parser.add_argument("--test-subset", type=int, default=0)
    parser.add_argument("--robustness", action="store_true",
                        help="instead: the robustness report (corruptions, real-world files; training.robustness)")
    args = parser.parse_args(argv)
    path = Path(args.model)
    if not (path / "saved_model.pb").exists():
        found = versions(path)
        if not found:
            parser.error(f"no SavedModel at {path} and no numbered versions under it")
        path = path / str(found[-1])
    cfg = Config(data_dir=args.data_dir, test_subset=args.test_subset)
    images, labels = load_test_arrays(cfg)
    if args.robustness:
        print(f"[evaluate] robustness of {path} on {len(labels)} test images", flush=True)
        report = robustness.robustness_report(path, images, labels, args.reports_dir)
        print(robustness.format_table(report))
        print(f"[evaluate] {', '.join(robustness.OUTPUTS)} in {args.reports_dir}")
        return
    print(f"[evaluate] {path} on {len(labels)} test images sent as PNG bytes", flush=True)
    test, probabilities = evaluate_export(path, images, labels)
    write_reports(args.reports_dir, {"model": str(path), "test": test}, images, labels, probabilities)
    print(f"[evaluate] accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}; reports in {args.reports_dir}")


if __name__ == "__main__":
    main()
