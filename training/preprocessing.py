"""Encoded image bytes -> the model's input, as TensorFlow ops that are exported inside the SavedModel.

Every runtime (TF Serving, the embedded server, evaluation of raw files) runs this same graph, so training
and serving cannot drift apart. Steps for one image:

1. guard: read the width and height the file declares in its header (PNG, GIF, BMP; JPEG through
   `extract_jpeg_shape`) and refuse more than MAX_SIDE pixels per side before decoding anything, so a
   20 KB PNG declaring 13000x13000 pixels costs nothing;
2. decode: PNG as RGBA (so transparency is known), every other format `tf.io.decode_image` reads as RGB
   (three channels: one channel fails on GIF, BMP and CMYK JPEG);
3. shrink to at most WORK_SIDE pixels per side with area averaging while still uint8, so a large photo
   never exists as floats;
4. grey, with luma weights that sum to one, so a grey PNG keeps its exact values;
5. transparency composited onto a background that contrasts with the opaque ink;
6. polarity: MNIST is a white digit on black; an image whose border is mostly light is inverted;
7. contrast: the background (the border's median) becomes 0 and the brightest ink 1; an image without
   enough contrast is refused as blank ("no ink found"), rather than answered with a confident guess;
8. lines: rows or columns inked across the whole image, when there are two or more (ruled or squared
   paper, a form's box, occluding bars), lose their own level, so the digit's strokes stay and the lines go;
9. the way MNIST itself was made: the ink's bounding box (specks and noise kept out of it) is scaled to fit
   20x20 keeping its aspect ratio and placed in 28x28 with its centre of mass at the centre.

Problems with an image (not an image, truncated, too large, no ink) raise InvalidArgumentError with a
message that says which: TF Serving and the embedded server answer INVALID_ARGUMENT / HTTP 400 with it.
"""

from __future__ import annotations

import tensorflow as tf

MAX_SIDE = 4096
WORK_SIDE = 256
IMAGE_SIZE = 28
DIGIT_BOX = 20  # MNIST's digits were scaled to fit 20x20, then centred by centre of mass in 28x28
INK_THRESHOLD = 0.1  # of the stretched range: what counts as ink
MIN_NEIGHBOURHOOD = 3  # ink with fewer inked pixels in its 3x3 neighbourhood is a speck, not part of the box
SOLID_INK, BOX_MARGIN = 0.25, 2  # the box keeps to BOX_MARGIN px around ink whose 3x3 mean reaches SOLID_INK
MIN_CONTRAST = 0.15  # below this between background and brightest ink, the image is taken as blank
LINE_COVER = 0.9  # a row or column inked along this share of its length is a line (ruled paper, a bar) ...
MIN_LINES = 2  # ... when there are at least this many such lines, apart from each other
LUMA = (0.299, 0.587, 0.114)


def _header(image_bytes: tf.Tensor, n: int = 32) -> tf.Tensor:
    """The first n bytes as int64, zero-padded, whatever the length of the input."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, n), "\0" * n]), 0, n)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _uint(b: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
    order = range(size) if big_endian else reversed(range(size))
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + b[start + i]
    return value


def _starts_with(b: tf.Tensor, magic: bytes) -> tf.Tensor:
    return tf.reduce_all(tf.equal(b[: len(magic)], tf.constant(list(magic), tf.int64)))


def declared_size(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) the file's header declares; (0, 0) for formats without one we read."""
    b = _header(image_bytes)
    zero = tf.constant(0, tf.int64)

    def bmp_height():
        h = _uint(b, 22, 4, big_endian=False)
        return tf.abs(tf.where(h >= 2**31, h - 2**32, h))  # signed: negative means top-down rows

    def jpeg_size():
        shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0], shape[1]

    return tf.case([
        (_starts_with(b, b"\x89PNG"), lambda: (_uint(b, 20, 4, True), _uint(b, 16, 4, True))),
        (_starts_with(b, b"GIF8"), lambda: (_uint(b, 8, 2, False), _uint(b, 6, 2, False))),
        (_starts_with(b, b"BM"), lambda: (bmp_height(), _uint(b, 18, 4, False))),
        (_starts_with(b, b"\xff\xd8\xff"), jpeg_size),
    ], default=lambda: (zero, zero), exclusive=True)


def check_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """The bytes, unchanged, once the declared size has been checked (InvalidArgumentError otherwise)."""
    height, width = declared_size(image_bytes)
    ok = tf.logical_and(height <= MAX_SIDE, width <= MAX_SIDE)
    message = tf.strings.format("image declares {}x{} pixels (width x height); the limit is {} per side",
                                (width, height, MAX_SIDE))
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
        return tf.identity(image_bytes)


def _shrink(image: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, c] -> float32 in [0, 1], area-averaged down to at most WORK_SIDE per side."""
    shape = tf.shape(image)
    longest = tf.cast(tf.maximum(shape[0], shape[1]), tf.float32)
    scale = tf.minimum(1.0, WORK_SIDE / longest)
    size = tf.maximum(1, tf.cast(tf.math.ceil(tf.cast(shape[:2], tf.float32) * scale), tf.int32))
    return tf.image.resize(image, size, method="area") / 255.0


def decode_rgba(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> float32 RGBA [h, w, 4] in [0, 1], at most WORK_SIDE per side."""
    def png():
        return _shrink(tf.io.decode_png(image_bytes, channels=4))

    def other():
        rgb = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        rgb = _shrink(tf.ensure_shape(rgb, [None, None, 3]))
        return tf.concat([rgb, tf.ones_like(rgb[..., :1])], axis=-1)

    is_png = tf.equal(tf.strings.substr(image_bytes, 0, 4), b"\x89PNG")
    return tf.ensure_shape(tf.cond(is_png, png, other), [None, None, 4])


def to_grey(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA -> grey [h, w, 1]; transparent areas take the shade that contrasts with the opaque ink."""
    grey = tf.tensordot(rgba[..., :3], tf.constant(LUMA), axes=1)[..., None]
    alpha = rgba[..., 3:]
    ink = tf.reduce_sum(grey * alpha) / tf.maximum(tf.reduce_sum(alpha), 1e-6)
    background = tf.where(ink < 0.5, 1.0, 0.0)
    return grey * alpha + background * (1.0 - alpha)


def _median(x: tf.Tensor) -> tf.Tensor:
    values = tf.sort(tf.reshape(x, [-1]))
    return values[tf.size(values) // 2]


def _border(grey: tf.Tensor) -> tf.Tensor:
    return tf.concat([grey[0, :, 0], grey[-1, :, 0], grey[:, 0, 0], grey[:, -1, 0]], axis=0)


def to_mnist_polarity(grey: tf.Tensor) -> tf.Tensor:
    """White digit on black: inverts images whose border is mostly light (the median resists a stroke
    that touches the edge)."""
    return tf.cond(_median(_border(grey)) > 0.5, lambda: 1.0 - grey, lambda: grey)


def stretch_contrast(grey: tf.Tensor) -> tf.Tensor:
    """Background (the border's median) to 0, the brightest ink to 1: grey paper, faint pencil and dim
    photos come out like MNIST's black and white. An image without enough contrast has no ink to read."""
    background = _median(_border(grey))
    contrast = tf.reduce_max(grey) - background
    message = tf.strings.format("no ink found: the image is blank or its contrast ({}) is below {}",
                                (contrast, MIN_CONTRAST))
    with tf.control_dependencies([tf.debugging.Assert(contrast >= MIN_CONTRAST, [message])]):
        return tf.clip_by_value((grey - background) / tf.maximum(contrast, MIN_CONTRAST), 0.0, 1.0)


def _lines_removed(ink: tf.Tensor, axis: int) -> tf.Tensor:
    """ink [h, w] without the lines along `axis` (1: rows, 0: columns) that span the image, when there are
    at least MIN_LINES of them: ruled paper and bars come in numbers, while a single stroke from edge to
    edge is more likely part of a tightly cropped digit (the bar of a 7). A line's own level (its median)
    is taken off it, so the line goes and darker strokes crossing it stay."""
    cover = tf.reduce_mean(tf.cast(ink > INK_THRESHOLD, tf.float32), axis=axis)
    is_line = cover >= LINE_COVER
    starts = tf.logical_and(is_line, tf.logical_not(tf.pad(is_line[:-1], [[1, 0]])))

    def remove() -> tf.Tensor:  # the sort for the medians only runs for images that have lines
        level = tf.expand_dims(tf.gather(tf.sort(ink, axis=axis), tf.shape(ink)[axis] // 2, axis=axis), axis)
        return tf.where(tf.expand_dims(is_line, axis), tf.maximum(ink - level, 0.0), ink)

    return tf.cond(tf.reduce_sum(tf.cast(starts, tf.int32)) >= MIN_LINES, remove, lambda: ink)


def remove_lines(ink: tf.Tensor) -> tf.Tensor:
    """[h, w, 1] -> the same without thin lines that run across the whole image: ruled or squared paper, a
    form's box, occluding bars. What a digit occluded by bars keeps is read as a digit with gaps (training
    augments with such gaps: `training.data.random_occlusion`). If nothing but lines is there, the image
    is left as it was, so "no ink" is not claimed for an image made of strokes."""
    cleaned = _lines_removed(_lines_removed(ink[:, :, 0], axis=1), axis=0)[:, :, None]
    return tf.where(tf.reduce_max(cleaned) > INK_THRESHOLD, cleaned, ink)


def _any_along(mask: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.cast(tf.where(tf.reduce_any(mask, axis=axis))[:, 0], tf.int32)


def _near(mask: tf.Tensor, margin: int) -> tf.Tensor:
    """[h, w] bool: within `margin` pixels of the bounding box of `mask` (everywhere if it is empty)."""
    def within(along: tf.Tensor) -> tf.Tensor:  # along: [n] bool, some pixel of the line is in the mask
        n = tf.size(along)
        first = tf.argmax(tf.cast(along, tf.int32), output_type=tf.int32)
        last = n - 1 - tf.argmax(tf.cast(along[::-1], tf.int32), output_type=tf.int32)
        positions = tf.range(n)
        inside = tf.logical_and(positions >= first - margin, positions <= last + margin)
        return tf.logical_or(inside, tf.logical_not(tf.reduce_any(along)))
    return tf.logical_and(within(tf.reduce_any(mask, axis=1))[:, None], within(tf.reduce_any(mask, axis=0))[None, :])


def ink_box(ink: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, left, height, width) of the ink. Specks and noise do not widen it: ink counts when at least
    MIN_NEIGHBOURHOOD of its 3x3 neighbourhood are ink (no lone specks), and only within BOX_MARGIN pixels
    of the box of the solid ink, where the 3x3 mean reaches SOLID_INK (noisy paper is inked all over,
    but not solidly). On clean digits the margin holds the faint tips of strokes: MNIST's boxes stay."""
    inked = ink[:, :, 0] > INK_THRESHOLD
    # one pooling for both 3x3 means: the share of inked pixels and the mean ink
    means = tf.nn.avg_pool2d(tf.stack([tf.cast(inked, tf.float32), ink[:, :, 0]], axis=-1)[None], 3, 1, "SAME")[0]
    mask = tf.logical_and(inked, means[:, :, 0] * 9.0 >= MIN_NEIGHBOURHOOD)
    solid = tf.logical_and(inked, means[:, :, 1] >= SOLID_INK)
    near = tf.logical_and(mask, _near(solid, BOX_MARGIN))
    mask = tf.where(tf.reduce_any(near), near, mask)
    rows, cols = _any_along(mask, 1), _any_along(mask, 0)
    found = tf.logical_and(tf.size(rows) > 0, tf.size(cols) > 0)
    with tf.control_dependencies([tf.debugging.Assert(found, ["no ink found: nothing stands out of the image"])]):
        top, left = tf.identity(rows[0]), tf.identity(cols[0])
    return top, left, rows[-1] + 1 - top, cols[-1] + 1 - left


def fit_and_centre(ink: tf.Tensor) -> tf.Tensor:
    """As MNIST was made: the ink's bounding box scaled to fit DIGIT_BOX x DIGIT_BOX keeping its aspect
    ratio, then placed in IMAGE_SIZE x IMAGE_SIZE with its centre of mass at the centre."""
    top, left, height, width = ink_box(ink)
    crop = ink[top:top + height, left:left + width]
    scale = DIGIT_BOX / tf.cast(tf.maximum(height, width), tf.float32)
    size = tf.maximum(1, tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale), tf.int32))
    digit = tf.cond(scale < 1.0,  # area averaging shrinks without aliasing; bilinear enlarges smoothly
                    lambda: tf.image.resize(crop, size, method="area"),
                    lambda: tf.image.resize(crop, size, method="bilinear"))
    digit = tf.clip_by_value(digit, 0.0, 1.0)
    mass = tf.maximum(tf.reduce_sum(digit), 1e-6)
    centre_y = tf.reduce_sum(digit[:, :, 0] * (tf.range(size[0], dtype=tf.float32)[:, None] + 0.5)) / mass
    centre_x = tf.reduce_sum(digit[:, :, 0] * (tf.range(size[1], dtype=tf.float32)[None, :] + 0.5)) / mass
    half = IMAGE_SIZE / 2 + 0.5  # MNIST's centres of mass sit at pixel index 14 (14.5 counting pixel centres)
    offset_y = tf.clip_by_value(tf.cast(tf.round(half - centre_y), tf.int32), 0, IMAGE_SIZE - size[0])
    offset_x = tf.clip_by_value(tf.cast(tf.round(half - centre_x), tf.int32), 0, IMAGE_SIZE - size[1])
    return tf.image.pad_to_bounding_box(digit, offset_y, offset_x, IMAGE_SIZE, IMAGE_SIZE)


def normalize(grey: tf.Tensor) -> tf.Tensor:
    """Grey [h, w, 1] in [0, 1], any polarity and size -> an MNIST-like [28, 28, 1] white digit on black."""
    ink = remove_lines(stretch_contrast(to_mnist_polarity(grey)))
    return tf.ensure_shape(fit_and_centre(ink), [IMAGE_SIZE, IMAGE_SIZE, 1])


def decode_and_normalize(image_bytes: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [28, 28, 1] in [0, 1], white digit on black."""
    return normalize(to_grey(decode_rgba(check_size(image_bytes))))


def decode_batch(image_bytes: tf.Tensor) -> tf.Tensor:
    """string [N] -> float32 [N, 28, 28, 1]. A few images at a time, so memory stays bounded."""
    return tf.map_fn(decode_and_normalize, image_bytes, parallel_iterations=4,
                     fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32))
