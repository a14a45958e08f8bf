"""Temperature scaling (Guo et al., 2017): one scalar T fitted on the validation split so that the
probability the model gives is the probability it is right; folded into the export as softmax(log p / T).

A network trained with cross-entropy to 99.5% accuracy says "100%" far more often than it is right every
time; dividing its logits by T > 1 softens that without changing which digit wins.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

ECE_BINS = 15


def scale_probabilities(probabilities, temperature: float):
    """softmax(log(p) / T): log p are the logits up to a constant, which softmax ignores. NumPy or TF."""
    if isinstance(probabilities, np.ndarray):
        logits = np.log(np.clip(probabilities, 1e-30, 1.0)) / temperature
        logits -= logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=-1, keepdims=True)
    logits = tf.math.log(tf.maximum(probabilities, 1e-30)) / temperature
    return tf.nn.softmax(logits, axis=-1)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-30, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the validation NLL: a coarse grid on log T, then golden-section."""
    def nll(log_t: float) -> float:
        return negative_log_likelihood(scale_probabilities(probabilities.astype(np.float64), np.exp(log_t)), labels)

    grid = np.linspace(np.log(0.05), np.log(20.0), 61)
    best = int(np.argmin([nll(x) for x in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by how many fall in each."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def calibration_report(before: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    after = scale_probabilities(before, temperature)
    return {
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": negative_log_likelihood(before, labels),
        "nll_after": negative_log_likelihood(after, labels),
    }
