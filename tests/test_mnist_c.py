"""The MNIST-C corruptions (training/mnist_c.py) on 200 real test digits.

Every corruption: uint8 digits of the input's shape, the same output for the same seed, and every one of the 200
digits changed (spatter too: at its severity a mud blob forms on every digit in practice, and a digit without one
would fail the test). Then, per corruption, what it measurably does to a digit: where ink may appear, how much ink
mass is kept, by how much a digit turns or shrinks, what the background becomes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import mnist_c

PAPER_ORDER = ["shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
               "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges"]
NAMES = list(mnist_c.CORRUPTIONS)
RANDOM = [name for name in NAMES if name not in mnist_c.DETERMINISTIC]


@pytest.fixture(scope="module")
def digits(mnist_test_arrays) -> np.ndarray:
    return mnist_test_arrays[0]


@pytest.fixture(scope="module")
def corrupted(digits) -> dict[str, np.ndarray]:
    return {name: mnist_c.corrupt(name, digits) for name in NAMES}


def ink_mass(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64).sum(axis=1)


def moments(images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per image: ink mass, centroid (row, col), and the central second moments mu20 (rows), mu02 (cols), mu11."""
    ink = images[..., 0].astype(np.float64)
    rows, cols = np.mgrid[0:28, 0:28]
    mass = ink.sum(axis=(1, 2))
    row_c = (ink * rows).sum(axis=(1, 2)) / mass
    col_c = (ink * cols).sum(axis=(1, 2)) / mass
    dr, dc = rows - row_c[:, None, None], cols - col_c[:, None, None]
    mu20, mu02, mu11 = ((ink * d).sum(axis=(1, 2)) / mass for d in (dr * dr, dc * dc, dr * dc))
    return mass, row_c, col_c, mu20, mu02, mu11


def test_the_fifteen_corruptions_in_the_papers_order():
    assert NAMES == PAPER_ORDER
    assert {"brightness", "scale", "stripe", "canny_edges"} == mnist_c.DETERMINISTIC


@pytest.mark.parametrize("name", NAMES)
def test_returns_uint8_digits_of_the_input_shape(name, digits, corrupted):
    assert corrupted[name].dtype == np.uint8
    assert corrupted[name].shape == digits.shape
    single = mnist_c.corrupt(name, digits[:1])
    assert single.dtype == np.uint8 and single.shape == (1, 28, 28, 1)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output_and_the_input_is_left_alone(name, digits, corrupted):
    before = digits.copy()
    again = mnist_c.corrupt(name, digits)
    np.testing.assert_array_equal(again, corrupted[name])
    np.testing.assert_array_equal(digits, before)


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_change_with_the_seed(name, digits):
    first, second = mnist_c.corrupt(name, digits, seed=1), mnist_c.corrupt(name, digits, seed=2)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("name", sorted(mnist_c.DETERMINISTIC))
def test_deterministic_corruptions_ignore_the_seed(name, digits, corrupted):
    np.testing.assert_array_equal(mnist_c.corrupt(name, digits, seed=99), corrupted[name])


@pytest.mark.parametrize("name", NAMES)
def test_every_digit_is_changed(name, digits, corrupted):
    changed = (corrupted[name] != digits).reshape(len(digits), -1).any(axis=1)
    assert changed.all(), f"{name} left {np.flatnonzero(~changed).tolist()} unchanged"


def test_shot_noise_keeps_black_black_and_quantises_ink_to_thirds(digits, corrupted):
    noisy = corrupted["shot_noise"]
    assert (noisy[digits == 0] == 0).all()
    assert set(np.unique(noisy).tolist()) <= {0, 85, 170, 255}  # Poisson(3x) / 3, clipped at 1


def test_impulse_noise_flips_about_17_percent_of_pixels_to_black_or_white(digits, corrupted):
    noisy = corrupted["impulse_noise"]
    changed = noisy != digits
    assert set(np.unique(noisy[changed]).tolist()) <= {0, 255}
    assert abs((noisy[digits == 0] == 255).mean() - 0.17 / 2) < 0.01  # the paper's amount: 17%
    assert abs((noisy[digits == 255] == 0).mean() - 0.17 / 2) < 0.02


def test_glass_blur_keeps_the_ink_but_blurs_away_saturated_strokes(digits, corrupted):
    blurred = corrupted["glass_blur"]
    assert np.all(np.abs(ink_mass(blurred) / ink_mass(digits) - 1) < 0.03)
    assert (blurred == 255).sum() < 0.1 * (digits == 255).sum()


def test_motion_blur_keeps_the_ink_and_smears_it(digits, corrupted):
    blurred = corrupted["motion_blur"]
    assert np.all(np.abs(ink_mass(blurred) / ink_mass(digits) - 1) < 0.06)
    inked = lambda images: (images > 0).reshape(len(images), -1).sum(axis=1)  # noqa: E731
    assert np.all(inked(blurred) > inked(digits))


def test_shear_stretches_the_ink_by_one_over_cos_of_the_shear(digits, corrupted):
    ratio = ink_mass(corrupted["shear"]) / ink_mass(digits)
    assert abs(np.median(ratio) - 1 / np.cos(0.4)) < 0.01  # the paper's shear, 0.4
    assert ratio.min() > 1.0


def test_scale_shrinks_the_digit_to_70_percent_about_the_centre(digits, corrupted):
    mass0, *_, rr0, cc0, _ = moments(digits)
    mass1, *_, rr1, cc1, _ = moments(corrupted["scale"])
    assert abs(np.median(mass1 / mass0) - 0.7**2) < 0.02
    spread = np.sqrt((rr1 + cc1) / (rr0 + cc0))
    assert np.all(np.abs(spread - 0.7) < 0.05)


def test_rotate_turns_the_digit_by_0_4_radians_about_the_centre(digits, corrupted):
    mass0, row0, col0, a20, a02, a11 = moments(digits)
    mass1, row1, col1, b20, b02, b11 = moments(corrupted["rotate"])
    assert np.all(np.abs(mass1 / mass0 - 1) < 0.03)
    # a rotation about the centre keeps the centroid's distance from the centre
    assert np.all(np.abs(np.hypot(row1 - 13.5, col1 - 13.5) - np.hypot(row0 - 13.5, col0 - 13.5)) < 0.3)
    # and turns the principal axis of elongated digits by the rotation angle
    spread = np.sqrt(((a20 - a02) / 2) ** 2 + a11**2)
    elongated = ((a20 + a02) / 2 + spread) > 3 * ((a20 + a02) / 2 - spread)
    turn = 0.5 * np.arctan2(2 * b11, b20 - b02) - 0.5 * np.arctan2(2 * a11, a20 - a02)
    turn = (turn + np.pi / 2) % np.pi - np.pi / 2
    assert elongated.sum() > 50
    assert np.all(np.abs(np.abs(turn[elongated]) - 0.4) < 0.05)  # the paper's angle, 0.4 radians


def test_brightness_raises_the_background_to_mid_grey(digits, corrupted):
    bright = corrupted["brightness"]
    assert set(np.unique(bright[digits == 0]).tolist()) == {128}
    assert (bright[digits == 255] == 255).all()
    assert (bright >= digits).all()


def test_translate_shifts_each_digit_by_three_pixels_in_x_and_y(digits, corrupted):
    def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
        out = np.zeros_like(image)
        out[max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
            image[max(-dy, 0):28 + min(-dy, 0), max(-dx, 0):28 + min(-dx, 0)]
        return out

    shifts = [(dy, dx) for dy in (-3, 3) for dx in (-3, 3)]
    used = set()
    for image, moved in zip(digits, corrupted["translate"]):
        matching = [s for s in shifts if np.array_equal(shifted(image, *s), moved)]
        assert len(matching) == 1
        used.add(matching[0])
    assert used == set(shifts)
    assert np.median(ink_mass(corrupted["translate"]) / ink_mass(digits)) > 0.99


def test_stripe_inverts_the_seven_outer_columns_on_each_side(digits, corrupted):
    striped = corrupted["stripe"]
    np.testing.assert_array_equal(striped[:, :, :7], 255 - digits[:, :, :7])
    np.testing.assert_array_equal(striped[:, :, 21:], 255 - digits[:, :, 21:])
    np.testing.assert_array_equal(striped[:, :, 7:21], digits[:, :, 7:21])


def test_fog_greys_the_background_and_the_digit_still_stands_out(digits, corrupted):
    foggy = corrupted["fog"].astype(np.float64)
    for image, fogged in zip(digits, foggy):
        background, ink = fogged[image == 0], fogged[image > 200]
        assert background.mean() > 5
        assert ink.mean() - background.mean() > 30  # ink adds 255 * m / (m + 3), about 64 levels, over the fog


def test_spatter_blends_blobs_towards_mud_grey(digits, corrupted):
    spattered = corrupted["spatter"]
    changed = spattered != digits
    assert (spattered[changed & (digits == 0)] <= 63).all()
    assert (spattered[changed & (digits == 255)] >= 63).all()
    assert (spattered[changed & (digits == 255)] < 255).all()


def test_dotted_line_adds_ink_only_in_its_dashes(digits, corrupted):
    dotted = corrupted["dotted_line"]
    assert (dotted >= digits).all()
    gaps = [col for col in range(28) if (col // 2) % 2 == 0 or col == 27]
    np.testing.assert_array_equal(dotted[:, :, gaps], digits[:, :, gaps])
    assert np.all((dotted > digits).reshape(len(digits), -1).sum(axis=1) >= 10)


def test_zigzag_adds_ink_between_columns_2_and_25(digits, corrupted):
    zigzagged = corrupted["zigzag"]
    assert (zigzagged >= digits).all()
    np.testing.assert_array_equal(zigzagged[:, :, [0, 1, 26, 27]], digits[:, :, [0, 1, 26, 27]])
    assert np.all((zigzagged > digits).reshape(len(digits), -1).sum(axis=1) >= 10)


def test_canny_edges_are_binary_and_lie_on_the_strokes_borders(digits, corrupted):
    edges = corrupted["canny_edges"][..., 0]
    assert set(np.unique(edges).tolist()) == {0, 255}
    assert not edges[:, [0, -1], :].any() and not edges[:, :, [0, -1]].any()
    ink = digits[..., 0] > 0

    def grow(mask: np.ndarray, steps: int) -> np.ndarray:
        for _ in range(steps):
            padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
            mask = np.stack([padded[:, dr:dr + 28, dc:dc + 28] for dr in range(3) for dc in range(3)]).any(axis=0)
        return mask

    on = edges.astype(bool)
    assert not (on & ~grow(ink, 2)).any()  # no edge away from the digit
    # and almost none deep inside a stroke (Canny does mark strong grey-level steps within thick strokes)
    deep_inside = ~grow(~ink, 3)  # ink at least 3 pixels from any background pixel
    assert (on & deep_inside).sum() < 0.01 * on.sum()
    assert np.all(edges.reshape(len(edges), -1).any(axis=1))


def test_canny_outlines_a_filled_square_with_a_one_pixel_ring():
    square = np.zeros((1, 28, 28, 1), dtype=np.uint8)
    square[0, 9:19, 9:19] = 255
    edges = mnist_c.corrupt("canny_edges", square)[0, :, :, 0]
    ring = np.zeros((28, 28), dtype=np.uint8)
    ring[9:19, 9:19] = 255
    ring[10:18, 10:18] = 0  # the square's own outermost pixels: non-maximum suppression keeps one of the two
    np.testing.assert_array_equal(edges, ring)


def test_canny_thresholds_and_hysteresis():
    """A step of height v gives a peak gradient of about 2.56 v after the sigma-1 smoothing, so the high threshold
    0.2 sits at grey 20 and the low threshold 0.1 at grey 10."""
    def edges_of(*blocks: tuple[slice, int]) -> np.ndarray:
        image = np.zeros((1, 28, 28, 1), dtype=np.uint8)
        for columns, grey in blocks:
            image[0, 9:19, columns] = grey
        return mnist_c.corrupt("canny_edges", image)[0, :, :, 0] > 0

    assert not edges_of((slice(9, 19), 19)).any()  # below the high threshold: no edge starts
    assert edges_of((slice(9, 19), 21)).sum() == 36  # above it: the full ring
    assert not edges_of((slice(9, 19), 15)).any()  # a weak square alone: nothing
    joined = edges_of((slice(9, 14), 40), (slice(14, 19), 15))  # the same weak half, joined to a strong half
    assert joined[9:19, 18].all()  # its far side is kept: connected to a strong edge


def test_corrupt_rejects_unknown_names_and_non_digit_arrays(digits):
    with pytest.raises(KeyError, match="unknown corruption"):
        mnist_c.corrupt("frost", digits)
    with pytest.raises(ValueError, match="uint8"):
        mnist_c.corrupt("shear", digits.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        mnist_c.corrupt("shear", digits[..., 0])


def test_contact_sheet_is_a_png_with_a_row_per_corruption(digits, tmp_path):
    path = mnist_c.contact_sheet(digits[:8], tmp_path / "sheets" / "mnist_c.png")
    assert path == tmp_path / "sheets" / "mnist_c.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as sheet:
        width, height = sheet.size
    assert height > width > 300  # 16 rows (clean + 15) of 8 digits
