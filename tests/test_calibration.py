"""Temperature scaling and the expected calibration error, on constructed probabilities with known answers."""

import numpy as np
import pytest
import tensorflow as tf

from training.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    scale_probabilities,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def overconfident() -> tuple[np.ndarray, np.ndarray]:
    """Logits whose calibrated temperature is 3 by construction, sharpened 3x: an overconfident model."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    logits = rng.normal(0, 1, (5000, 10))
    logits[np.arange(5000), labels] += 2.0
    calibrated = softmax(logits)
    sampled = np.array([rng.choice(10, p=p) for p in calibrated])  # labels drawn from the calibrated model
    return softmax(logits * 3.0), sampled


def test_ece_of_known_cases():
    certain = np.eye(10)[[0, 1, 2, 3]]
    assert expected_calibration_error(certain, np.array([0, 1, 2, 3])) == 0.0
    assert expected_calibration_error(certain, np.array([0, 1, 5, 5])) == pytest.approx(0.5)
    unsure = np.full((4, 10), 0.05)
    unsure[:, 0] = 0.55
    assert expected_calibration_error(unsure, np.array([0, 0, 1, 1])) == pytest.approx(0.05)


def test_fitted_temperature_undoes_the_overconfidence(overconfident):
    probabilities, labels = overconfident
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    report = calibration_report(probabilities, labels, temperature)
    assert report["ece_after"] < 0.02 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]


def test_scaling_keeps_the_winner_and_numpy_agrees_with_tensorflow(overconfident):
    probabilities = overconfident[0][:50].astype(np.float32)
    scaled = scale_probabilities(probabilities, 2.5)
    np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(scale_probabilities(tf.constant(probabilities), 2.5).numpy(), scaled, atol=1e-6)
    np.testing.assert_allclose(scale_probabilities(probabilities, 1.0), probabilities, atol=1e-6)
    np.testing.assert_allclose(scale_probabilities(scaled, 1 / 2.5), probabilities, atol=1e-5)
