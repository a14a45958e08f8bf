"""Encoded image bytes -> the model's input, as TensorFlow ops that are exported inside the SavedModel.

Every runtime (TF Serving, the embedded server, evaluation of raw files) runs this same graph, so training
and serving cannot drift apart. Steps for one image:

1. guard: read the width and height the file declares in its header (PNG, GIF, BMP, WebP; JPEG through
   `extract_jpeg_shape`) and refuse more than MAX_SIDE pixels per side, or more than MAX_CALL_PIXELS for all
   the images of a call, before decoding anything, so a
   20 KB PNG declaring 13000x13000 pixels costs nothing; other formats are refused unread; a GIF's frames are
   read from their own descriptors (a 16x16 screen may hold an 8000x8000 frame) and bounded one by one and
   in all; a PNG's chunks up to IEND must each fit in the file (one declaring 2 GB in a 1 KB file was
   allocated), and there may be at most MAX_PNG_CHUNKS of them; a JPEG may hold at most MAX_JPEG_SCANS scans;
2. decode: PNG as RGBA (so transparency is known), every other format `tf.io.decode_image` reads as RGB
   (three channels: one channel fails on GIF, BMP and CMYK JPEG);
3. shrink to at most WORK_SIDE pixels per side with area averaging while still uint8, so a large photo
   never exists as floats;
4. grey, with luma weights that sum to one, so a grey PNG keeps its exact values;
5. transparency composited onto a background that contrasts with the opaque ink;
6. polarity: MNIST is a white digit on black; an image whose background (the border's median, or where the
   border is mixed, that of the pixels off uniform rows and columns) is nearer its brightest pixel than its
   darkest (dark ink on lighter paper) is inverted;
7. contrast: the background becomes 0 and the brightest ink 1; an image without enough contrast is refused
   as blank ("no ink found"), rather than answered with a confident guess;
8. lines: bands that run in from two opposite edges (a table beside the sheet, a scan's margins) are cleared;
   rows or columns inked across the whole image, when there are two or more (ruled or squared paper, a
   form's box, occluding bars), lose their own level, so the digit's strokes stay and the lines go;
9. the way MNIST itself was made: the ink's bounding box (specks and noise kept out of it) is scaled to fit
   20x20 keeping its aspect ratio and placed in 28x28 with its centre of mass at the centre.

Problems with an image (not an image, truncated, too large, no ink) raise InvalidArgumentError with a
message that says which: TF Serving and the embedded server answer INVALID_ARGUMENT / HTTP 400 with it.
"""

from __future__ import annotations

import tensorflow as tf

MAX_SIDE = 4096
MAX_CALL_PIXELS = 16 * MAX_SIDE * MAX_SIDE  # the pixels all images of one call may declare: 16 of the largest
WORK_SIDE = 256
BATCHED_PIXELS = 1 << 21  # the most pixels (as declared) decode_batch decodes together: 8 MB of RGBA
IMAGE_SIZE = 28
DIGIT_BOX = 20  # MNIST's digits were scaled to fit 20x20, then centred by centre of mass in 28x28
INK_THRESHOLD = 0.1  # of the stretched range: what counts as ink
MIN_NEIGHBOURHOOD = 3  # ink with fewer inked pixels in its 3x3 neighbourhood is a speck, not part of the box
SOLID_INK, BOX_MARGIN = 0.25, 2  # the box keeps to BOX_MARGIN px around ink whose 3x3 mean reaches SOLID_INK
MIN_CONTRAST = 0.15  # below this between background and brightest ink, the image is taken as blank
LINE_COVER = 0.9  # a row or column inked along this share of its length is a line (ruled paper, a bar) ...
MIN_LINES = 2  # ... when there are at least this many such lines, apart from each other
BAND_COVER = 0.5  # an edge band goes on inwards while its lines are inked along this share of their length
UNEVEN = 0.05  # the sides of the border differ in level by this much: the background is evened out
MIXED_BORDER = 0.2  # a border with more than this share on each side of the mid-level does not give the background
MAX_JPEG_SCANS = 100  # a progressive JPEG from libjpeg (Pillow) holds about 10
MAX_PNG_CHUNKS = 8192  # libpng writes 8 KB IDAT chunks (2048 in a 16 MB request); a chunk a row, 4096
LUMA = (0.299, 0.587, 0.114)


# The graph below is written with TensorFlow's own control flow (tf.cond, tf.while_loop, tf.map_fn), so
# tf.function's AutoGraph has nothing to convert in it; told so, it traces the same graph in less than half the
# time (every export traces it; docs/benchmarks.md).
_graph_code = tf.autograph.experimental.do_not_convert


def _header(image_bytes: tf.Tensor, n: int = 32) -> tf.Tensor:
    """The first n bytes of each image as int64 [..., n], zero-padded, whatever the length of the input."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, n), "\0" * n]), 0, n)
    # shaped explicitly: decode_raw cannot tell the byte count of an empty batch
    return tf.reshape(tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64),
                      tf.concat([tf.shape(image_bytes), [n]], 0))


# The size fields `_read_headers` reads, (first byte, bytes, big-endian) in the 32-byte header: PNG's IHDR
# height and width, GIF's logical screen, BMP's, WebP's VP8 (lossy), VP8L (lossless, packed) and VP8X (canvas).
_FIELDS = {"png_h": (20, 4, True), "png_w": (16, 4, True), "gif_h": (8, 2, False), "gif_w": (6, 2, False),
           "bmp_h": (22, 4, False), "bmp_w": (18, 4, False), "vp8_h": (28, 2, False), "vp8_w": (26, 2, False),
           "vp8l": (21, 4, False), "vp8x_h": (27, 3, False), "vp8x_w": (24, 3, False)}


def _fields(b: tf.Tensor) -> dict[str, tf.Tensor]:
    """The unsigned integers of _FIELDS in headers [n, 32], each [n]: one gather and one weighted sum for all
    of them (a byte at a time, they were a third of the graph's ops for one image)."""
    index, weight = [], []
    for start, size, big_endian in _FIELDS.values():
        order = range(size - 1, -1, -1) if big_endian else range(size)  # the weight of byte k is 256 ** order[k]
        index.append([start + k for k in range(size)] + [0] * (4 - size))
        weight.append([256 ** e for e in order] + [0] * (4 - size))
    values = tf.reduce_sum(tf.gather(b, index, axis=1) * tf.constant(weight, tf.int64), axis=-1)
    return dict(zip(_FIELDS, tf.unstack(values, len(_FIELDS), axis=1)))


def _starts_with(b: tf.Tensor, magic: bytes, at: int = 0) -> tf.Tensor:
    return tf.reduce_all(tf.equal(b[..., at:at + len(magic)], tf.constant(list(magic), tf.int64)), axis=-1)


def _formats(b: tf.Tensor) -> dict[str, tf.Tensor]:
    """Which of the formats whose size `declared_size` reads each header [..., 32] starts as."""
    return {"png": _starts_with(b, b"\x89PNG"), "gif": _starts_with(b, b"GIF8"), "bmp": _starts_with(b, b"BM"),
            "jpeg": _starts_with(b, b"\xff\xd8\xff"),
            "webp": tf.logical_and(_starts_with(b, b"RIFF"), _starts_with(b, b"WEBP", at=8))}


def _read_headers(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(known, height, width) of each image, of the input's shape (a scalar or a batch): whether it is one of
    the formats `_formats` names, and the size its header declares (0 and 0 for other formats). One pass over a
    batch's headers; JPEG's through `extract_jpeg_shape`, one JPEG at a time."""
    flat = tf.reshape(image_bytes, [-1])
    b = _header(flat)
    kind = _formats(b)
    zero = tf.zeros_like(b[:, 0])
    f = _fields(b)
    bmp_height = tf.abs(tf.where(f["bmp_h"] >= 2**31, f["bmp_h"] - 2**32, f["bmp_h"]))  # negative: top-down rows
    # WebP's first chunk: VP8 (lossy), VP8L (lossless: 14 bits width - 1, 14 bits height - 1) or VP8X (the canvas)
    lossless = f["vp8l"]
    vp8, vp8l, vp8x = (tf.logical_and(kind["webp"], _starts_with(b, chunk, at=12)) for chunk in (b"VP8 ", b"VP8L",
                                                                                                  b"VP8X"))
    jpegs = tf.where(kind["jpeg"])[:, 0]
    jpeg_sizes = tf.map_fn(lambda data: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
                           tf.gather(flat, jpegs), fn_output_signature=tf.TensorSpec([2], tf.int64))
    jpeg_sizes = tf.scatter_nd(jpegs[:, None], jpeg_sizes, tf.stack([tf.size(flat, out_type=tf.int64), 2]))

    def pick(png, gif, bmp, jpeg, lossy, lossless_, extended):
        value = zero
        for where, then in ((kind["png"], png), (kind["gif"], gif), (kind["bmp"], bmp), (kind["jpeg"], jpeg),
                            (vp8, lossy), (vp8l, lossless_), (vp8x, extended)):
            value = tf.where(where, then, value)
        return tf.reshape(value, tf.shape(image_bytes))

    height = pick(f["png_h"], f["gif_h"], bmp_height, jpeg_sizes[:, 0], f["vp8_h"] % 16384,
                  (lossless // 16384) % 16384 + 1, f["vp8x_h"] + 1)
    width = pick(f["png_w"], f["gif_w"], f["bmp_w"], jpeg_sizes[:, 1], f["vp8_w"] % 16384, lossless % 16384 + 1,
                 f["vp8x_w"] + 1)
    known = tf.reshape(tf.reduce_any(tf.stack(list(kind.values()), axis=-1), axis=-1), tf.shape(image_bytes))
    return known, height, width


def declared_size(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) each image's header declares, int64 of the input's shape (a scalar or a batch); 0 and 0
    for formats without one we read (tf.io.decode_image also decodes others, JPEG XL in TF 2.21, which
    `check_headers` refuses unread)."""
    _, height, width = _read_headers(image_bytes)
    return height, width


def gif_frames(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(frames, the largest side of any frame, the pixels of all frames) a GIF's image descriptors declare,
    each int64, read by walking its blocks: a GIF's logical screen may say 16x16 while a frame inside says
    8000x8000, and the decoder holds every frame at its own size. Extensions and image data are skipped a
    sub-block (up to 255 bytes) per step, so the walk costs about one step per 255 bytes of the file."""
    data = tf.cast(tf.io.decode_raw(image_bytes, tf.uint8), tf.int64)
    size = tf.shape(data, out_type=tf.int64)[0]

    def at(i):  # the byte at i, 0 past the end (a truncated file then ends the walk)
        i = tf.cast(i, tf.int64)
        return tf.where(i < size, tf.gather(data, tf.minimum(i, size - 1)), tf.constant(0, tf.int64))

    def u16(i):
        return at(i) + 256 * at(i + 1)

    def table(packed):  # bytes of the colour table a packed field announces
        return tf.where(packed >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8),
                        tf.constant(0, tf.int64))

    zero = tf.constant(0, tf.int64)
    start = 13 + table(at(10))

    def step(pos, in_blocks, frames, side, pixels):
        # in_blocks: pos is at a sub-block's size byte (0 ends the chain); else at a block's first byte
        length = at(pos)

        def sub_block():
            return tf.where(length == 0, pos + 1, pos + 1 + length), length != 0, frames, side, pixels

        def block():
            descriptor = length == 0x2C
            width, height = u16(pos + 5), u16(pos + 7)
            after_descriptor = pos + 10 + table(at(pos + 9)) + 1  # colour table, then the LZW code size
            return (tf.where(descriptor, after_descriptor, pos + 2), tf.constant(True),
                    frames + tf.cast(descriptor, tf.int64),
                    tf.where(descriptor, tf.maximum(side, tf.maximum(width, height)), side),
                    pixels + tf.where(descriptor, width * height, zero))

        return tf.cond(in_blocks, sub_block, block)

    def going(pos, in_blocks, frames, side, pixels):
        ends = tf.logical_and(tf.logical_not(in_blocks), tf.logical_not(
            tf.logical_or(tf.equal(at(pos), 0x21), tf.equal(at(pos), 0x2C))))  # the trailer, or not a GIF block
        return tf.logical_and(pos < size, tf.logical_not(ends))

    _, _, frames, side, pixels = tf.while_loop(going, step, (start, tf.constant(False), zero, zero, zero))
    return frames, side, pixels


def check_headers(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The images [N], unchanged, once their headers have been read (InvalidArgumentError otherwise): each of a
    format `declared_size` reads (or empty: the decoder's own error then), each within MAX_SIDE pixels a side,
    and all of them within MAX_CALL_PIXELS (a GIF by its logical screen; its frames are bounded image by image).
    Each image bounded on its own did not bound a call: 16 MB holds a thousand 16 KB PNGs that each declare
    4096x4096, about 100 s of decoding. In the graph, so TF Serving refuses as the embedded server does.
    Returns the images and the (height, width) their headers declare."""
    known, height, width = _read_headers(image_bytes)
    known = tf.logical_or(known, tf.equal(tf.strings.length(image_bytes), 0))
    too_large = tf.logical_or(height > MAX_SIDE, width > MAX_SIDE)

    def side() -> tf.Tensor:  # about the first image over the limit (only then: an empty batch has none)
        first = tf.argmax(tf.cast(too_large, tf.int32))
        return tf.strings.format("image declares {}x{} pixels (width x height); the limit is {} per side",
                                 (tf.gather(width, first), tf.gather(height, first), MAX_SIDE))

    total = tf.reduce_sum(height * width)
    call = tf.strings.format("the {} images of this request declare {} pixels in all; the limit is {} (16 images "
                             "of {}x{}): send fewer or smaller images a request",
                             (tf.size(image_bytes), total, MAX_CALL_PIXELS, MAX_SIDE, MAX_SIDE))
    with tf.control_dependencies([
            tf.debugging.Assert(tf.reduce_all(known), ["Unknown image file format: PNG, JPEG, GIF, BMP or WebP "
                                                       "expected"]),
            tf.debugging.Assert(tf.logical_not(tf.reduce_any(too_large)),
                                [tf.cond(tf.reduce_any(too_large), side, lambda: tf.constant(""))]),
            tf.debugging.Assert(total <= MAX_CALL_PIXELS, [call])]):
        return tf.identity(image_bytes), height, width


def check_png_chunks(image_bytes: tf.Tensor) -> tf.Tensor:
    """The PNGs (a scalar or a batch), unchanged, once every chunk of each up to IEND has been found to fit in
    its file: a 1 KB PNG whose tEXt chunk declared 2^31 - 1 bytes made the decoder allocate 2 GB before it gave
    up. One step a chunk for the whole batch (a 28x28 PNG has three or four), each reading 8 bytes of every
    file still being walked; a file's walk stops at IEND or at a chunk type that is not four ASCII letters
    (libpng refuses those itself), and more than MAX_PNG_CHUNKS chunks are refused, so 16 MB of 12-byte chunks
    cannot keep a request in the loop. Every file must hold PNG's 8-byte signature."""
    files = tf.reshape(image_bytes, [-1])
    size = tf.cast(tf.strings.length(files), tf.int64)
    zero = tf.zeros_like(size)

    def going(pos, worst, count, ended):  # [n] bool: the files whose walk goes on
        return tf.logical_and(tf.logical_and(pos + 12 <= size, worst <= 0),
                              tf.logical_and(count <= MAX_PNG_CHUNKS, tf.logical_not(ended)))

    def step(pos, worst, count, ended):
        walking = going(pos, worst, count, ended)
        at = tf.where(walking, pos, 0)  # the files that stopped read their signature: every read is 8 bytes
        eight = tf.fill(tf.shape(at), tf.constant(8, tf.int64))
        head = tf.reshape(tf.cast(tf.io.decode_raw(tf.strings.substr(files, at, eight), tf.uint8), tf.int64),
                          tf.concat([tf.shape(at), [8]], 0))
        length = ((head[:, 0] * 256 + head[:, 1]) * 256 + head[:, 2]) * 256 + head[:, 3]
        kind = head[:, 4:]
        upper = kind - (kind // 32 % 2) * 32  # letters folded to upper case
        letters = tf.reduce_all(tf.logical_and(upper >= 65, upper <= 90), axis=1)
        iend = tf.reduce_all(tf.equal(kind, [[73, 69, 78, 68]]), axis=1)
        counted = tf.logical_and(walking, letters)
        return (tf.where(walking, pos + 12 + length, pos),
                tf.where(counted, tf.maximum(worst, pos + 12 + length - size), worst),
                count + tf.cast(walking, tf.int64),
                tf.logical_or(ended, tf.logical_and(walking, tf.logical_or(tf.logical_not(letters), iend))))

    _, overrun, chunks, _ = tf.while_loop(lambda *state: tf.reduce_any(going(*state)), step,
                                          (tf.fill(tf.shape(size), tf.constant(8, tf.int64)), zero, zero,
                                           tf.zeros_like(size, tf.bool)))
    first = tf.argmax(tf.cast(overrun > 0, tf.int32))  # about the first file that overruns (0 if none does)
    message = tf.strings.format("PNG chunk declares {} bytes more than the file holds",
                                tf.reduce_max(tf.concat([overrun[first:first + 1], [0]], 0)))
    too_many = f"PNG has more than {MAX_PNG_CHUNKS} chunks"
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(overrun <= 0), [message]),
                                  tf.debugging.Assert(tf.reduce_all(chunks <= MAX_PNG_CHUNKS), [too_many])]):
        return tf.identity(image_bytes)


def check_gif_frames(image_bytes: tf.Tensor) -> tf.Tensor:
    """The bytes, unchanged, once a GIF's frames have been checked: each within MAX_SIDE per side, and all of
    them, at their own size (giflib holds each) and at the logical screen's (the decoder's output holds every
    frame), within MAX_SIDE ** 2 pixels. Other formats pass unread."""
    def check() -> tf.Tensor:
        frames, side, pixels = gif_frames(image_bytes)
        height, width = declared_size(image_bytes)
        total = tf.maximum(pixels, frames * height * width)
        ok = tf.logical_and(side <= MAX_SIDE, total <= MAX_SIDE * MAX_SIDE)
        message = tf.strings.format("GIF declares {} frame(s), the largest {} px on a side, {} pixels in all; the "
                                    "limits are {} per side and {} pixels", (frames, side, total, MAX_SIDE,
                                                                            MAX_SIDE * MAX_SIDE))
        with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
            return tf.identity(image_bytes)

    return tf.cond(tf.equal(tf.strings.substr(image_bytes, 0, 4), b"GIF8"), check, lambda: image_bytes)


def check_jpeg_scans(image_bytes: tf.Tensor) -> tf.Tensor:
    """The bytes, unchanged, once a JPEG has been found to hold at most MAX_JPEG_SCANS scans: libjpeg decodes a
    progressive JPEG scan by scan over the whole image, and one whose last scan was repeated 1,000 times
    (889 KB) took 11 s. Scans are counted by their SOS markers (0xFF 0xDA: inside entropy-coded data an 0xFF is
    always followed by 0x00 or a restart marker). Other formats pass unread."""
    def check() -> tf.Tensor:
        data = tf.io.decode_raw(image_bytes, tf.uint8)
        scans = tf.reduce_sum(tf.cast(tf.logical_and(tf.equal(data[:-1], 0xFF), tf.equal(data[1:], 0xDA)),
                                      tf.int32))
        message = tf.strings.format("JPEG holds {} scans; the limit is {}", (scans, MAX_JPEG_SCANS))
        with tf.control_dependencies([tf.debugging.Assert(scans <= MAX_JPEG_SCANS, [message])]):
            return tf.identity(image_bytes)

    return tf.cond(tf.equal(tf.strings.substr(image_bytes, 0, 2), b"\xff\xd8"), check, lambda: image_bytes)


def _shrink(image: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, c] (or a batch of them, [n, h, w, c]) -> float32 in [0, 1], area-averaged down to at most
    WORK_SIDE per side."""
    shape = tf.shape(image)[-3:-1]
    longest = tf.cast(tf.reduce_max(shape), tf.float32)
    scale = tf.minimum(1.0, WORK_SIDE / longest)
    size = tf.maximum(1, tf.cast(tf.math.ceil(tf.cast(shape, tf.float32) * scale), tf.int32))
    # at its own size, area resizing copies each pixel (bit for bit): skipped (a 28x28 PNG: 7 us an image at 64)
    return tf.cond(tf.reduce_all(tf.equal(size, shape)), lambda: tf.cast(image, tf.float32),
                   lambda: tf.image.resize(image, size, method="area")) / 255.0


def _pngs_rgba(files: tf.Tensor) -> tf.Tensor:
    """PNGs [n] whose headers declare one size -> float32 RGBA [n, h, w, 4] in [0, 1], at most WORK_SIDE per
    side: the chunks of all of them walked at once, each decoded (the decoder takes one file), shrunk as a batch."""
    checked = check_png_chunks(files)
    pixels = tf.cond(tf.equal(tf.size(checked), 1), lambda: tf.io.decode_png(checked[0], channels=4)[None],
                     lambda: tf.map_fn(lambda data: tf.io.decode_png(data, channels=4), checked,
                                       parallel_iterations=4,
                                       fn_output_signature=tf.TensorSpec([None, None, 4], tf.uint8)))
    return _shrink(pixels)


def decode_rgba(files: tf.Tensor) -> tf.Tensor:
    """Files [n] whose headers `check_headers` has read -> float32 RGBA [n, h, w, 4] in [0, 1], at most WORK_SIDE
    per side: PNGs that declare one size (any n, `_pngs_rgba`), or one file of another format (n = 1)."""
    def other():
        image = files[0]
        rgb = tf.io.decode_image(check_jpeg_scans(check_gif_frames(image)), channels=3, expand_animations=False)
        rgb = _shrink(tf.ensure_shape(rgb, [None, None, 3]))
        return tf.concat([rgb, tf.ones_like(rgb[..., :1])], axis=-1)[None]

    is_png = tf.equal(tf.strings.substr(files[0], 0, 4), b"\x89PNG")
    return tf.ensure_shape(tf.cond(is_png, lambda: _pngs_rgba(files), other), [None, None, None, 4])


def to_grey(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA [h, w, 4] -> grey [h, w, 1] (or [n, h, w, 4] -> [n, h, w, 1]); transparent areas take the shade
    that contrasts with the opaque ink of their image."""
    # one matrix product over the pixels, alpha weighted 0: no copy of the colour channels, as tensordot makes
    grey = tf.reshape(tf.matmul(tf.reshape(rgba, [-1, 4]), tf.constant([[LUMA[0]], [LUMA[1]], [LUMA[2]], [0.0]])),
                      tf.concat([tf.shape(rgba)[:-1], [1]], 0))
    alpha = rgba[..., 3:]
    pixels = [-3, -2, -1]
    ink = tf.reduce_sum(grey * alpha, axis=pixels, keepdims=True) / tf.maximum(
        tf.reduce_sum(alpha, axis=pixels, keepdims=True), 1e-6)
    background = tf.where(ink < 0.5, 1.0, 0.0)
    return grey * alpha + background * (1.0 - alpha)


# The steps below work on a batch of images of one size, [n, h, w, 1]: the serving graph runs them on a call's
# PNGs of one size together, on other images one at a time (n = 1), training on a batch of noisy 28x28 digits.
# Decisions that skip work (line removal) are taken for the batch, so a single image pays only for its own.

def _per_image(x: tf.Tensor) -> tf.Tensor:
    """[n] -> [n, 1, 1, 1], to broadcast a per-image value over images."""
    return x[:, None, None, None]


def _median(x: tf.Tensor) -> tf.Tensor:
    """[n, k] -> [n]: the upper median of each row."""
    return tf.sort(x, axis=-1)[:, tf.shape(x)[1] // 2]


def _border(grey: tf.Tensor) -> tf.Tensor:
    """[n, h, w, 1] -> [n, 2 (h + w)]: the pixels along the edges."""
    return tf.concat([grey[:, 0, :, 0], grey[:, -1, :, 0], grey[:, :, 0, 0], grey[:, :, -1, 0]], axis=1)


def _masked_median(x: tf.Tensor, keep: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """x [n, k] in [0, 1], keep [n, k] bool -> (the upper median of the kept values of each row, how many)."""
    count = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
    ordered = tf.sort(tf.where(keep, x, 2.0), axis=1)  # what is not kept sorts after every value
    return tf.gather(ordered, tf.minimum(count // 2, tf.shape(x)[1] - 1), batch_dims=1), count


def background(grey: tf.Tensor) -> tf.Tensor:
    """[n, h, w, 1] -> [n]: the level of the paper (or board, or screen) the digit is on.

    The border's median, which resists a stroke that touches the edge. Where the border is mixed (between
    MIXED_BORDER and 1 - MIXED_BORDER of it on the bright side of the image's mid-level: the frame of a
    photo, a scan's dark margins, MNIST-C's stripes of inverted columns), the border does not say, and the
    level is the median of the pixels off the rows and columns that are one shade across the whole image
    (LINE_COVER of them on one side): frames, margins and bands go, and the digit's surroundings decide."""
    flat = grey[..., 0]
    low, high = tf.reduce_min(flat, axis=[1, 2]), tf.reduce_max(flat, axis=[1, 2])
    bright = flat > ((low + high) / 2)[:, None, None]
    border_bright = tf.reduce_mean(tf.cast(_border(bright[..., None]), tf.float32), axis=1)
    mixed = tf.logical_and(border_bright > MIXED_BORDER, border_bright < 1.0 - MIXED_BORDER)
    plain = _median(_border(grey))

    def refined() -> tf.Tensor:  # the sort over every pixel only runs when some image has a mixed border
        def uniform(axis: int) -> tf.Tensor:
            share = tf.reduce_mean(tf.cast(bright, tf.float32), axis=axis)
            return tf.logical_or(share >= LINE_COVER, share <= 1.0 - LINE_COVER)
        keep = tf.logical_not(tf.logical_or(uniform(2)[:, :, None], uniform(1)[:, None, :]))
        n = tf.shape(flat)[0]
        level, count = _masked_median(tf.reshape(flat, [n, -1]), tf.reshape(keep, [n, -1]))
        return tf.where(tf.logical_and(mixed, count > 0), level, plain)

    return tf.cond(tf.reduce_any(mixed), refined, lambda: plain)


def to_mnist_polarity(grey: tf.Tensor) -> tf.Tensor:
    """White digit on black: inverts images whose background (see `background`) is nearer their brightest
    pixel than their darkest, i.e. whose ink is darker than the paper. Against the image's own range, not
    mid-grey: white chalk on a mid-grey board stays as it is (MNIST-C's brightness, a background of 128, was
    inverted into "no ink") and faint pencil on grey paper is inverted whichever side of mid-grey the paper is."""
    level = background(grey)
    darkest, brightest = tf.reduce_min(grey, axis=[1, 2, 3]), tf.reduce_max(grey, axis=[1, 2, 3])
    return tf.where(_per_image(level - darkest > brightest - level), 1.0 - grey, grey)


def stretch_contrast(grey: tf.Tensor) -> tf.Tensor:
    """Background (see `background`) to 0, the brightest ink to 1: grey paper, faint pencil and dim
    photos come out like MNIST's black and white. An image without enough contrast has no ink to read."""
    level = background(grey)
    contrast = tf.reduce_max(grey, axis=[1, 2, 3]) - level
    lowest = tf.reduce_min(contrast)
    message = tf.strings.format("no ink found: the image is blank or its contrast ({}) is below {}",
                                (lowest, MIN_CONTRAST))
    with tf.control_dependencies([tf.debugging.Assert(lowest >= MIN_CONTRAST, [message])]):
        stretched = (grey - _per_image(level)) / _per_image(tf.maximum(contrast, MIN_CONTRAST))
        return tf.clip_by_value(stretched, 0.0, 1.0)


def _lines_removed(ink: tf.Tensor, axis: int) -> tf.Tensor:
    """ink [n, h, w] without the lines along `axis` (2: rows, 1: columns) that span the image, in the images
    that have at least MIN_LINES of them: ruled paper and bars come in numbers, while a single stroke from edge
    to edge is more likely part of a tightly cropped digit (the bar of a 7). A line's own level (its median)
    is taken off it, so the line goes and darker strokes crossing it stay."""
    cover = tf.reduce_mean(tf.cast(ink > INK_THRESHOLD, tf.float32), axis=axis)  # [n, lines]
    is_line = cover >= LINE_COVER
    starts = tf.logical_and(is_line, tf.logical_not(tf.pad(is_line[:, :-1], [[0, 0], [1, 0]])))
    ruled = tf.reduce_sum(tf.cast(starts, tf.int32), axis=1) >= MIN_LINES  # [n]

    def remove() -> tf.Tensor:  # the sort for the medians only runs when some image has lines
        level = tf.expand_dims(tf.gather(tf.sort(ink, axis=axis), tf.shape(ink)[axis] // 2, axis=axis), axis)
        removed = tf.where(tf.expand_dims(is_line, axis), tf.maximum(ink - level, 0.0), ink)
        return tf.where(ruled[:, None, None], removed, ink)

    return tf.cond(tf.reduce_any(ruled), remove, lambda: ink)


def _edge_bands(ink: tf.Tensor, axis: int) -> tf.Tensor:
    """ink [n, h, w] -> [n, lines] bool: the bands of lines along `axis` (2: rows, 1: columns) that run in from
    both opposite edges, each starting with a line inked along LINE_COVER of its length and going on while
    the lines are inked along BAND_COVER: the table on both sides of a photographed sheet, a scan's margins,
    MNIST-C's stripes. Both edges, because a band on one side may be the bar of a tightly cropped 7."""
    cover = tf.reduce_mean(tf.cast(ink > INK_THRESHOLD, tf.float32), axis=axis)  # [n, lines]

    def from_start(c: tf.Tensor) -> tf.Tensor:
        run = tf.math.cumprod(tf.cast(c >= BAND_COVER, tf.float32), axis=1) > 0
        return tf.logical_and(run, c[:, :1] >= LINE_COVER)

    start, end = from_start(cover), from_start(cover[:, ::-1])[:, ::-1]
    both = tf.logical_and(tf.reduce_any(start, axis=1), tf.reduce_any(end, axis=1))[:, None]
    return tf.logical_and(both, tf.logical_or(start, end))


def remove_lines(ink: tf.Tensor) -> tf.Tensor:
    """[n, h, w, 1] -> the same without bands at two opposite edges (see `_edge_bands`) and thin lines that run
    across the whole image: ruled or squared paper, a form's box, occluding bars. What a digit occluded by
    bars keeps is read as a digit with gaps (training augments with such gaps: `training.data.random_occlusion`).
    If nothing but lines is there, the image is left as it was, so "no ink" is not claimed for an image made of
    strokes."""
    flat = ink[..., 0]
    bands = tf.logical_or(_edge_bands(flat, axis=2)[:, :, None], _edge_bands(flat, axis=1)[:, None, :])
    flat = tf.where(bands, 0.0, flat)
    cleaned = _lines_removed(_lines_removed(flat, axis=2), axis=1)[..., None]
    return tf.where(_per_image(tf.reduce_max(cleaned, axis=[1, 2, 3]) > INK_THRESHOLD), cleaned, ink)


def _first_and_last(along: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """along [n, k] bool -> the first and last index where it is true, each [n] (0 and k - 1 if nowhere)."""
    k = tf.shape(along)[1]
    first = tf.argmax(tf.cast(along, tf.int32), axis=1, output_type=tf.int32)
    last = k - 1 - tf.argmax(tf.cast(along[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
    return first, last


def _near(mask: tf.Tensor, margin: int) -> tf.Tensor:
    """[n, h, w] bool: within `margin` pixels of the bounding box of `mask` (everywhere if it is empty)."""
    def within(along: tf.Tensor) -> tf.Tensor:  # along: [n, k] bool, some pixel of the line is in the mask
        first, last = _first_and_last(along)
        positions = tf.range(tf.shape(along)[1])[None, :]
        inside = tf.logical_and(positions >= first[:, None] - margin, positions <= last[:, None] + margin)
        return tf.logical_or(inside, tf.logical_not(tf.reduce_any(along, axis=1, keepdims=True)))
    return tf.logical_and(within(tf.reduce_any(mask, axis=2))[:, :, None],
                          within(tf.reduce_any(mask, axis=1))[:, None, :])


def _mean3x3(x: tf.Tensor) -> tf.Tensor:
    """[n, h, w] -> the mean of each pixel's 3x3 neighbourhood (within the image), avg_pool2d's "SAME". Pooled
    with the images as channels: oneDNN's pooling runs along channels, so one channel of n images cost several
    times n channels of one image, for the same floats (and stacking two inputs as channels cost more still)."""
    return tf.transpose(tf.nn.avg_pool2d(tf.transpose(x, [1, 2, 0])[None], 3, 1, "SAME")[0], [2, 0, 1])


def ink_box(ink: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, left, height, width) of the ink of each image, each [n]. Specks and noise do not widen it: ink
    counts when at least MIN_NEIGHBOURHOOD of its 3x3 neighbourhood are ink (no lone specks), and only within
    BOX_MARGIN pixels of the box of the solid ink, where the 3x3 mean reaches SOLID_INK (noisy paper is inked
    all over, but not solidly). On clean digits the margin holds the faint tips of strokes: MNIST's boxes stay."""
    inked = ink[..., 0] > INK_THRESHOLD
    # of inked pixels (a select, not a cast: grappler would move a cast after the transpose, and oneDNN logs an
    # error for a transpose of booleans), and of the ink
    share, mean = _mean3x3(tf.where(inked, 1.0, 0.0)), _mean3x3(ink[..., 0])
    mask = tf.logical_and(inked, share * 9.0 >= MIN_NEIGHBOURHOOD)
    solid = tf.logical_and(inked, mean >= SOLID_INK)
    near = tf.logical_and(mask, _near(solid, BOX_MARGIN))
    mask = tf.where(tf.reduce_any(near, axis=[1, 2])[:, None, None], near, mask)
    rows, cols = tf.reduce_any(mask, axis=2), tf.reduce_any(mask, axis=1)
    found = tf.reduce_all(tf.logical_and(tf.reduce_any(rows, axis=1), tf.reduce_any(cols, axis=1)))
    with tf.control_dependencies([tf.debugging.Assert(found, ["no ink found: nothing stands out of the image"])]):
        (top, bottom), (left, right) = _first_and_last(rows), _first_and_last(cols)
        return tf.identity(top), tf.identity(left), bottom + 1 - top, right + 1 - left


def _resampling(start: tf.Tensor, length: tf.Tensor, size: tf.Tensor, area: tf.Tensor, extent: tf.Tensor) -> tf.Tensor:
    """[n, DIGIT_BOX, extent]: the weights by which TensorFlow's resize kernels make output pixel j (j < size,
    rows beyond are 0) of the span [start, start + length) of an axis `extent` long, resized to `size`: area
    averaging where `area` (ResizeArea: the share of each input pixel in [j s, (j + 1) s), s = length / size),
    bilinear with half-pixel centres elsewhere (ResizeBilinear: the two pixels around (j + 0.5) s - 0.5, clamped
    to the span). All [n]; a resize is then two matrix products, for the whole batch at once."""
    length_f, size_f = tf.cast(length, tf.float32)[:, None, None], tf.cast(size, tf.float32)[:, None, None]
    s = length_f / size_f
    j = tf.range(DIGIT_BOX, dtype=tf.float32)[None, :, None]
    i = tf.cast(tf.range(extent)[None, None, :] - start[:, None, None], tf.float32)  # relative to the span
    inside = tf.logical_and(tf.logical_and(i >= 0.0, i < length_f), j < size_f)
    overlap = tf.maximum(tf.minimum(i + 1.0, (j + 1.0) * s) - tf.maximum(i, j * s), 0.0) / s
    centre = (j + 0.5) * s - 0.5
    below = tf.floor(centre)
    lerp = centre - below
    lower, upper = tf.maximum(below, 0.0), tf.minimum(tf.math.ceil(centre), length_f - 1.0)
    tent = tf.where(tf.equal(i, lower), 1.0 - lerp, 0.0) + tf.where(tf.equal(i, upper), lerp, 0.0)
    return tf.where(inside, tf.where(area[:, None, None], overlap, tent), 0.0)


def _placement(offset: tf.Tensor) -> tf.Tensor:
    """[n, IMAGE_SIZE, DIGIT_BOX]: 1 where output pixel y takes pixel y - offset of the digit (a shift)."""
    y = tf.range(IMAGE_SIZE)[None, :, None]
    return tf.cast(tf.equal(y - offset[:, None, None], tf.range(DIGIT_BOX)[None, None, :]), tf.float32)


def fit_and_centre(ink: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor,
                   width: tf.Tensor) -> tf.Tensor:
    """Images [n, h, w, 1] and their ink boxes ([n] each) -> [n, 28, 28, 1], as MNIST was made: each box scaled
    to fit DIGIT_BOX x DIGIT_BOX keeping its aspect ratio (area averaging shrinks without aliasing, bilinear
    enlarges smoothly), then placed in IMAGE_SIZE x IMAGE_SIZE with its centre of mass at the centre. Each box
    has its own size, yet the whole batch goes through a few matrix products: the resize is separable, so a
    crop and resize is a [DIGIT_BOX, h] and a [w, DIGIT_BOX] matrix of the kernels' own weights, and the
    placement two shifts."""
    longest = tf.cast(tf.maximum(height, width), tf.float32)
    scale = DIGIT_BOX / longest
    size_y = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
    size_x = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
    area = scale < 1.0
    shape = tf.shape(ink)
    rows = _resampling(top, height, size_y, area, shape[1])  # [n, box, h]
    cols = _resampling(left, width, size_x, area, shape[2])  # [n, box, w]
    digit = tf.clip_by_value(tf.matmul(tf.matmul(rows, ink[..., 0]), cols, transpose_b=True), 0.0, 1.0)
    mass = tf.maximum(tf.reduce_sum(digit, axis=[1, 2]), 1e-6)
    position = tf.range(DIGIT_BOX, dtype=tf.float32) + 0.5
    centre_y = tf.reduce_sum(digit * position[None, :, None], axis=[1, 2]) / mass
    centre_x = tf.reduce_sum(digit * position[None, None, :], axis=[1, 2]) / mass
    half = IMAGE_SIZE / 2 + 0.5  # MNIST's centres of mass sit at pixel index 14 (14.5 counting pixel centres)
    offset_y = tf.clip_by_value(tf.cast(tf.round(half - centre_y), tf.int32), 0, IMAGE_SIZE - size_y)
    offset_x = tf.clip_by_value(tf.cast(tf.round(half - centre_x), tf.int32), 0, IMAGE_SIZE - size_x)
    placed = tf.matmul(tf.matmul(_placement(offset_y), digit), _placement(offset_x), transpose_b=True)
    return placed[..., None]


BACKGROUND_SIDE, BACKGROUND_WINDOW = 32, 11  # the background is estimated at 32x32, with 11x11 filters


def even_out_background(ink: tf.Tensor) -> tf.Tensor:
    """White ink on a background whose level drifts across the image (a shadow, uneven light, fog) -> the
    same on a flat background: the image less its morphological opening (a minimum then a maximum filter
    wider than any stroke, a third of the image: the white top-hat), estimated on a BACKGROUND_SIDE copy
    (the background is smooth) and enlarged back, over what is left of the range there (in a shadow, ink and
    paper are both darker). Only for images whose border's four sides differ in level
    by UNEVEN or more; the rest (MNIST's digits among them) pass unchanged."""
    sides = tf.stack([_median(ink[:, 0, :, 0]), _median(ink[:, -1, :, 0]), _median(ink[:, :, 0, 0]),
                      _median(ink[:, :, -1, 0])], axis=1)
    uneven = tf.reduce_max(sides, axis=1) - tf.reduce_min(sides, axis=1) >= UNEVEN

    def flatten() -> tf.Tensor:
        small = tf.image.resize(ink, [BACKGROUND_SIDE, BACKGROUND_SIDE], method="area")
        eroded = -tf.nn.max_pool2d(-small, BACKGROUND_WINDOW, 1, "SAME")
        opened = tf.nn.max_pool2d(eroded, BACKGROUND_WINDOW, 1, "SAME")
        level = tf.image.resize(opened, tf.shape(ink)[1:3], method="bilinear")
        brightest = tf.reduce_max(ink, axis=[1, 2, 3], keepdims=True)
        # light falls on ink and paper alike: a shadow scales the range, so the range is scaled back
        flat = tf.maximum(ink - level, 0.0) / tf.maximum(brightest - level, MIN_CONTRAST)
        return tf.where(uneven[:, None, None, None], tf.minimum(flat, 1.0) * brightest, ink)

    return tf.cond(tf.reduce_any(uneven), flatten, lambda: ink)


def _ink(grey: tf.Tensor) -> tf.Tensor:
    """[n, h, w, 1] grey, any polarity -> white ink on black, stretched, lines removed."""
    return remove_lines(stretch_contrast(even_out_background(to_mnist_polarity(grey))))


@_graph_code
def normalize_batch(grey: tf.Tensor) -> tf.Tensor:
    """Grey images of one size [n, h, w, 1] in [0, 1], any polarity -> MNIST-like [n, 28, 28, 1] white digits on
    black. Each image comes out as it would alone (n = 1): every step decides per image."""
    ink = _ink(grey)
    return fit_and_centre(ink, *ink_box(ink))


@_graph_code
def decode_batch(image_bytes: tf.Tensor) -> tf.Tensor:
    """string [N] -> float32 [N, 28, 28, 1].

    PNGs of one size (one digit, what a client sends in a batch, and what server-side batching merges) are
    decoded and normalised as a batch: the same answers to the last bit as each image alone (normalize_batch's
    promise), and the dozens of small steps of the normalisation run once for the call instead of once an
    image. A batch holds at most BATCHED_PIXELS pixels (it is decoded whole before it is shrunk): a larger call
    goes through in batches of that size. Other calls are normalised image by image.

    One loop over the call's parts (a batch, or one image) through one decoder and one normalisation: each is
    one copy in the graph (every process that loads the export optimises the graph at its first call, and every
    export traces it: its size is paid there).
    """
    image_bytes, height, width = check_headers(image_bytes)
    count = tf.size(image_bytes, out_type=tf.int64)
    same_png = tf.logical_and(
        tf.reduce_all(tf.equal(tf.strings.substr(image_bytes, 0, 8), b"\x89PNG\r\n\x1a\n")),
        tf.logical_and(tf.reduce_all(tf.equal(height, height[:1])), tf.reduce_all(tf.equal(width, width[:1]))))
    each = tf.reduce_max(tf.concat([height * width, [1]], 0))  # the pixels of one image (of every one, if same_png)
    together = tf.logical_and(tf.logical_and(count > 0, same_png), each <= BATCHED_PIXELS)
    per_part = tf.where(together, tf.maximum(BATCHED_PIXELS // each, 1), tf.constant(1, tf.int64))
    parts = (count + per_part - 1) // per_part

    def step(i, done):
        part = image_bytes[i * per_part:(i + 1) * per_part]
        return i + 1, done.write(tf.cast(i, tf.int32), normalize_batch(to_grey(decode_rgba(part))))

    done = tf.TensorArray(tf.float32, size=tf.cast(parts, tf.int32), infer_shape=False,
                          element_shape=[None, IMAGE_SIZE, IMAGE_SIZE, 1])
    _, done = tf.while_loop(lambda i, _: i < parts, step, (tf.constant(0, tf.int64), done), parallel_iterations=4)
    return tf.ensure_shape(done.concat(), [None, IMAGE_SIZE, IMAGE_SIZE, 1])


# The image graph as one tf.function, traced once a process for everything that runs it (the export's
# signatures, the robustness report, the benchmark): each traced it on its own before, a few seconds each time.
decode_images = tf.function(decode_batch, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
