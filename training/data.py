"""The input pipelines of MNIST: the tfds splits, decoded, shuffled, batched and augmented for training.

The dataset itself, and how it is made available offline, is `training.mnist`; `prepare` is that module's.
"""

from __future__ import annotations

import itertools
import math

import tensorflow as tf
import tensorflow_datasets as tfds

from training import preprocessing
from training.config import Config
from training.mnist import NAME, TRAIN_SIZE


def split_names(cfg: Config) -> dict[str, str]:
    """tfds split strings: the validation images are the last `validation_size` of the 60,000."""
    n_train = TRAIN_SIZE - cfg.validation_size
    train_end = min(cfg.train_subset, n_train) if cfg.train_subset else n_train
    test = f"test[:{cfg.test_subset}]" if cfg.test_subset else "test"
    return {"train": f"train[:{train_end}]", "validation": f"train[{n_train}:]", "test": test}


def worker_share(split: str, workers: int = 1, index: int = 0):
    """The part of a tfds split that worker `index` of `workers` reads in multi-worker training: a contiguous
    1/workers of it, read by tfds alone (tfds.even_splits), the same number of examples on every worker (the
    last workers - 1 at most are left out). Equal shares make equal numbers of batches: a worker with one batch
    more than the others would wait for them in its gradient all-reduce for ever.

    Why this way: tf.data's default auto-sharding, by file, needs a file per worker, and tfds wrote each MNIST
    split as one file (the same holds for tfds.ReadConfig(input_context=...), which shards by file too); sharding
    by data (auto_shard_policy DATA) would have every worker read, cache, shuffle and augment every image to
    keep 1/N of them, when augmentation is most of the CPU time of a step."""
    if workers == 1:
        return split
    return tfds.even_splits(split, n=workers, drop_remainder=True)[index]


def load_split(cfg: Config, split: str, workers: int = 1, index: int = 0) -> tf.data.Dataset:
    """(uint8 [28, 28, 1], int64) pairs of one split, in a fixed order; with `workers`, worker `index`'s share
    (`worker_share`)."""
    return tfds.load(NAME, split=worker_share(split_names(cfg)[split], workers, index), data_dir=cfg.data_dir,
                     as_supervised=True, shuffle_files=False, download=False)


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1]; the exported graph does the same to decoded images."""
    return tf.cast(image, tf.float32) / 255.0


def never(probability) -> bool:
    """A share known, before tracing, to pick no digit (a tensor share may change between epochs)."""
    return isinstance(probability, (int, float)) and probability <= 0


def random_stroke_width(images: tf.Tensor, probability: float, seed: int,
                        pixels: int = Config.stroke_pixels) -> tf.Tensor:
    """Draws a share of the digits with strokes `pixels` thicker on each side (dilation by a square of side
    2 * pixels + 1) or thinner (erosion), half each."""
    if never(probability):
        return images
    side = 2 * pixels + 1
    u = tf.random.uniform([tf.shape(images)[0]], seed=seed)
    picked = tf.where(u < probability)  # only these are pooled
    chosen, thicken = tf.gather_nd(images, picked), tf.gather_nd(u, picked) < probability / 2
    changed = tf.where(thicken[:, None, None, None], tf.nn.max_pool2d(chosen, side, 1, "SAME"),
                       -tf.nn.max_pool2d(-chosen, side, 1, "SAME"))
    return tf.tensor_scatter_nd_update(images, picked, changed)


def random_occlusion(images: tf.Tensor, probability: float, seed: int,
                     periods: tuple[int, int] = (Config.occlusion_period_min, Config.occlusion_period_max),
                     widths: tuple[int, int] = (Config.occlusion_width_min, Config.occlusion_width_max)) -> tf.Tensor:
    """Erases parallel bars (`widths` px wide every `periods` px, both uniform integers within their inclusive
    bounds; horizontal or vertical, random phase) out of a share of the digits: the network learns to read a
    digit with gaps, which is what an occluded digit, or one whose ruled lines the serving graph removed
    (`preprocessing.remove_lines`), looks like."""
    if never(probability):
        return images
    n, side = tf.shape(images)[0], tf.shape(images)[1]
    period = tf.random.uniform([n, 1], periods[0], periods[1] + 1, dtype=tf.int32, seed=seed)
    width = tf.random.uniform([n, 1], widths[0], widths[1] + 1, dtype=tf.int32, seed=seed + 1)
    phase = tf.random.uniform([n, 1], 0, periods[1] + 1, dtype=tf.int32, seed=seed + 2)
    bars = (tf.range(side)[None, :] + phase) % period < width  # [n, side]
    horizontal = tf.random.uniform([n, 1, 1, 1], seed=seed + 3) < 0.5
    mask = tf.where(horizontal, bars[:, :, None, None], bars[:, None, :, None])
    chosen = tf.random.uniform([n, 1, 1, 1], seed=seed + 4) < probability
    return tf.where(tf.logical_and(chosen, mask), tf.zeros_like(images), images)


def random_noise(images: tf.Tensor, probability: float, seed: int, impulse_max: float = 0.08,
                 sigmas: tuple[float, float] = (Config.noise_sigma_min, Config.noise_sigma_max),
                 impulse_min: float = Config.impulse_min) -> tf.Tensor:
    """Adds gaussian noise (a standard deviation uniform within `sigmas`, as a share of the range) or salt and
    pepper (on a share of the pixels uniform from `impulse_min` to `impulse_max`), half each, to a share of the
    digits, rounds them to 8 bits as a file holds them, and reads them back through the serving graph's
    normalisation (`preprocessing.normalize_batch`): what a noisy scan or photo looks like to the network, noise
    cut to the ink's box by the graph. Clean MNIST digits always have ink, so the graph's "no ink" checks never
    fire here."""
    if never(probability):
        return images
    chosen = tf.random.uniform([tf.shape(images)[0]], seed=seed) < probability
    picked = tf.boolean_mask(images, chosen)
    n, shape = tf.shape(picked)[0], tf.shape(picked)
    sigma = tf.random.uniform([n, 1, 1, 1], *sigmas, seed=seed + 1)
    gaussian = picked + sigma * tf.random.normal(shape, seed=seed + 2)
    fraction = tf.random.uniform([n, 1, 1, 1], impulse_min, max(impulse_max, impulse_min), seed=seed + 3)
    salt = tf.cast(tf.random.uniform(shape, seed=seed + 4) < 0.5, tf.float32)
    impulse = tf.where(tf.random.uniform(shape, seed=seed + 5) < fraction, salt, picked)
    noisy = tf.where(tf.random.uniform([n, 1, 1, 1], seed=seed + 6) < 0.5, gaussian, impulse)
    noisy = tf.round(tf.clip_by_value(noisy, 0.0, 1.0) * 255.0) / 255.0
    normalised = preprocessing.normalize_batch(noisy)
    return tf.tensor_scatter_nd_update(images, tf.where(chosen), normalised)


def random_affine(images: tf.Tensor, cfg: Config, seed: int) -> tf.Tensor:
    """Rotates, shears, zooms and shifts each digit by random amounts (uniform within the config's ranges)
    about the image centre, in one bilinear resampling: the four as one matrix cost one transform instead of
    four, and the digit is interpolated once instead of blurred four times."""
    n = tf.shape(images)[0]
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)

    def uniform(limit: float, offset: int) -> tf.Tensor:
        return tf.random.uniform([n], -limit, limit, seed=seed + offset)

    angle = uniform(cfg.rotation_degrees * math.pi / 180.0, 0)
    shear_x, shear_y = uniform(cfg.shear_fraction, 1), uniform(cfg.shear_fraction, 2)
    shift_x, shift_y = uniform(cfg.shift_fraction, 3) * width, uniform(cfg.shift_fraction, 4) * height
    zoom = 1.0 + uniform(cfg.zoom_fraction, 5)
    zeros, ones = tf.zeros([n]), tf.ones([n])

    def matrices(*rows: tf.Tensor) -> tf.Tensor:  # 9 tensors [n], row by row -> [n, 3, 3]
        return tf.reshape(tf.stack(rows, axis=1), [n, 3, 3])

    def translation(dx, dy) -> tf.Tensor:
        return matrices(ones, zeros, dx, zeros, ones, dy, zeros, zeros, ones)

    cx, cy = (width - 1.0) / 2.0 * ones, (height - 1.0) / 2.0 * ones
    cos, sin = tf.cos(angle), tf.sin(angle)
    rotate = matrices(cos, -sin, zeros, sin, cos, zeros, zeros, zeros, ones)
    shear = matrices(ones, shear_x, zeros, shear_y, ones, zeros, zeros, zeros, ones)
    scale = matrices(zoom, zeros, zeros, zeros, zoom, zeros, zeros, zeros, ones)
    # input pixel -> output pixel; the transform op wants the inverse, output -> input, in 8 numbers
    forward = translation(cx + shift_x, cy + shift_y) @ rotate @ shear @ scale @ translation(-cx, -cy)
    inverse = tf.linalg.inv(forward)
    transforms = tf.reshape(inverse, [n, 9])[:, :8] / inverse[:, 2:, 2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


def random_line(images: tf.Tensor, probability: float, seed: int,
                widths: tuple[float, float] = (Config.line_width_min, Config.line_width_max)) -> tf.Tensor:
    """Draws one straight stroke at full ink, as wide as a uniform draw within `widths` (pixels), between two
    random points of the image over a share of the digits: a pen slip, a digit crossed out, a line of a form
    through the writing."""
    if never(probability):
        return images
    n, side = tf.shape(images)[0], tf.cast(tf.shape(images)[1], tf.float32)
    ends = tf.random.uniform([n, 4], 2.0, side - 2.0, seed=seed)  # x0, y0, x1, y1
    width = tf.random.uniform([n, 1, 1], *widths, seed=seed + 1)
    grid = tf.range(side) + 0.5
    x, y = grid[None, None, :], grid[None, :, None]
    x0, y0, x1, y1 = (ends[:, i, None, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    t = tf.clip_by_value(((x - x0) * dx + (y - y0) * dy) / tf.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    distance = tf.sqrt(tf.square(x - x0 - t * dx) + tf.square(y - y0 - t * dy))
    line = tf.clip_by_value(width / 2.0 + 0.5 - distance, 0.0, 1.0)[..., None]
    chosen = tf.random.uniform([n, 1, 1, 1], seed=seed + 2) < probability
    return tf.where(chosen, tf.maximum(images, line), images)


def random_outline(images: tf.Tensor, probability: float, seed: int,
                   pixels: int = Config.outline_pixels) -> tf.Tensor:
    """Draws a share of the digits as their outline: the ring `pixels` wide around the strokes, hollow inside
    (bubble writing, an edge map of a photo), read back through the serving graph's normalisation, which fits
    the ring's box as it would a file's."""
    if never(probability):
        return images
    chosen = tf.random.uniform([tf.shape(images)[0]], seed=seed) < probability
    picked = tf.cast(tf.boolean_mask(images, chosen) > 0.5, tf.float32)
    ring = tf.nn.max_pool2d(picked, 2 * pixels + 1, 1, "SAME") - picked
    return tf.tensor_scatter_nd_update(images, tf.where(chosen), preprocessing.normalize_batch(ring))


# The op seeds of each augmentation, as (first offset from cfg.seed, how many it uses: seed, seed + 1, ...). Two
# random ops with one seed draw the same numbers, so the ranges must not overlap (checked below). The offsets
# are those every published run was trained with: other offsets would give other draws.
AUGMENTATION_SEEDS = {"random_stroke_width": (4, 1), "random_occlusion": (5, 5), "random_noise": (10, 7),
                      "random_affine": (20, 6), "random_outline": (30, 1), "random_line": (40, 3)}
_offsets = sorted(AUGMENTATION_SEEDS.values())
if any(first + used > following for (first, used), (following, _) in itertools.pairwise(_offsets)):
    raise ValueError(f"augmentation op seeds overlap: {AUGMENTATION_SEEDS}")


def augmenter(cfg: Config, share: tf.Variable | None = None):
    """Outlines, noise, random rotation, shear, shift, zoom, stroke width, occluding bars and strokes across the
    digit of a batch: the kinds of variation handwriting and its photos have (no flips: a flipped digit is
    another symbol or none). `share`, read at each batch, scales the probabilities of all but the geometric
    ones (0 in the plain finish, `PlainFinish`)."""

    def p(probability: float):
        return probability if share is None or probability <= 0 else probability * share

    def seed(augmentation: str) -> int:
        return cfg.seed + AUGMENTATION_SEEDS[augmentation][0]

    def augment(images: tf.Tensor) -> tf.Tensor:  # outlines first, on digits that have ink
        images = random_outline(images, p(cfg.outline_probability), seed("random_outline"), cfg.outline_pixels)
        images = random_noise(images, p(cfg.noise_probability), seed("random_noise"), cfg.impulse_max,
                              (cfg.noise_sigma_min, cfg.noise_sigma_max), cfg.impulse_min)
        images = random_affine(images, cfg, seed("random_affine"))
        images = random_stroke_width(images, p(cfg.stroke_probability), seed("random_stroke_width"), cfg.stroke_pixels)
        images = random_occlusion(images, p(cfg.occlusion_probability), seed("random_occlusion"),
                                  (cfg.occlusion_period_min, cfg.occlusion_period_max),
                                  (cfg.occlusion_width_min, cfg.occlusion_width_max))
        return random_line(images, p(cfg.line_probability), seed("random_line"),
                           (cfg.line_width_min, cfg.line_width_max))

    return augment


def pipeline(ds: tf.data.Dataset, cfg: Config, training: bool, share: tf.Variable | None = None) -> tf.data.Dataset:
    """Decoded, cached, shuffled (training), batched, augmented (training; `share` as in `augmenter`) and
    prefetched."""
    ds = ds.map(lambda x, y: (to_unit_float(x), y), num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    if training and cfg.augment:
        augment = augmenter(cfg, share)
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
