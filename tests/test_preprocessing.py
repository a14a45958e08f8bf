"""The in-graph decoding: real encoded files of every format in, MNIST-like 28x28 white-on-black out."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from training import preprocessing

decode = preprocessing.decode_images


def run(*files: bytes) -> np.ndarray:
    return decode(tf.constant(list(files))).numpy()


def encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header declares width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 200_000))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def digit(mnist_test_arrays) -> tuple[np.ndarray, np.ndarray]:
    """A real MNIST digit as uint8 [28, 28] and as the float [28, 28, 1] the model trained on."""
    image = mnist_test_arrays[0][0, :, :, 0]
    return image, image[..., None].astype(np.float32) / 255.0


def test_mnist_png_decodes_to_exactly_the_training_input(digit):
    image, expected = digit
    np.testing.assert_allclose(run(encode(image, "PNG"))[0], expected, atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_every_format_decodes(digit, fmt):
    image, expected = digit
    out = run(encode(np.stack([image] * 3, axis=-1), fmt))[0]
    assert out.shape == (28, 28, 1)
    assert np.abs(out - expected).mean() < (0.03 if fmt == "JPEG" else 1e-3)


def test_dark_ink_on_light_paper_is_turned_white_on_black(digit):
    image, expected = digit
    big = np.kron(255 - image, np.ones((10, 10), np.uint8))  # 280x280, black on white
    out = run(encode(big, "PNG"))[0]
    assert np.abs(out - expected).mean() < 0.05


def test_transparent_background_takes_the_colour_that_contrasts_with_the_ink(digit):
    image, expected = digit
    black_ink = np.zeros((28, 28, 4), np.uint8)
    black_ink[..., 3] = image  # opaque where the digit is, black everywhere
    white_ink = black_ink.copy()
    white_ink[..., :3] = 255
    for rgba in (black_ink, white_ink):
        out = run(encode(rgba, "PNG", "RGBA"))[0]
        assert np.abs(out - expected).mean() < 0.02


def test_batch_of_mixed_sizes_and_formats(digit):
    image, _ = digit
    files = [encode(image, "PNG"), encode(np.kron(image, np.ones((3, 5), np.uint8)), "JPEG"),
             encode(image[:10, :20], "BMP")]
    assert run(*files).shape == (3, 28, 28, 1)


@pytest.mark.parametrize("width,height", [(13_000, 13_000), (4097, 10), (10, 5000)])
def test_declared_size_over_the_limit_is_refused_before_decoding(width, height):
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"image declares {width}x{height} pixels"):
        run(png_declaring(width, height))


def test_declared_size_is_read_from_every_header():
    wide = np.zeros((30, 70), np.uint8)
    for fmt, options in (("PNG", {}), ("GIF", {}), ("BMP", {}), ("JPEG", {}), ("WEBP", {}),
                         ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\0\0MM"})):  # VP8, VP8L, VP8X
        buffer = io.BytesIO()
        Image.fromarray(wide).save(buffer, format=fmt, **options)
        height, width = preprocessing.declared_size(tf.constant(buffer.getvalue()))
        assert (int(height), int(width)) == (30, 70), (fmt, options, buffer.getvalue()[12:16])
    assert [int(v) for v in preprocessing.declared_size(tf.constant(b"no header"))] == [0, 0]


def test_a_batchs_headers_are_read_in_one_pass_as_each_alone():
    wide = np.zeros((30, 70), np.uint8)
    files = []
    for fmt in ("PNG", "JPEG", "GIF", "JPEG", "BMP", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(wide[: 10 + len(files)]).save(buffer, format=fmt)
        files.append(buffer.getvalue())
    files += [b"no header", b""]
    height, width = (v.numpy().tolist() for v in preprocessing.declared_size(tf.constant(files)))
    assert height == [10, 11, 12, 13, 14, 15, 0, 0] and width == [70] * 6 + [0, 0]
    assert [[int(v) for v in preprocessing.declared_size(tf.constant(f))] for f in files] == [
        [h, w] for h, w in zip(height, width)]


def test_an_empty_batch_is_an_empty_answer_not_an_error():
    assert decode(tf.constant([], tf.string)).shape == (0, 28, 28, 1)


def test_a_call_whose_images_declare_too_many_pixels_in_all_is_refused_before_decoding():
    largest = png_declaring(preprocessing.MAX_SIDE, preprocessing.MAX_SIDE)
    allowed = preprocessing.MAX_CALL_PIXELS // preprocessing.MAX_SIDE ** 2
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"the {allowed + 1} images of this request declare"):
        run(*[largest] * (allowed + 1))
    with pytest.raises(tf.errors.InvalidArgumentError) as error:  # within the bound: decoding's own error
        run(*[largest] * allowed)
    assert "pixels in all" not in error.value.message


def test_a_large_webp_is_refused_before_it_is_decoded():
    buffer = io.BytesIO()
    Image.new("L", (5000, 300), 0).save(buffer, format="WEBP", lossless=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="declares 5000x300 pixels"):
        run(buffer.getvalue())


def _gif(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF by hand: a logical screen without colour table, then frames each declaring its own size, with
    a scrap of image data (what a decoder would allocate for is what the descriptor says)."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # a graphic control extension, as animations have
    for width, height in frames:
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x4c\x01\x00"
    return out + b"\x3b"


def test_gif_frames_are_read_from_their_own_descriptors():
    for frames in ([(70, 30)], [(50, 40)] * 5, [(16, 16), (300, 200), (5, 5)]):
        counted, side, pixels = (int(v) for v in preprocessing.gif_frames(tf.constant(_gif((16, 16), frames))))
        assert (counted, side, pixels) == (len(frames), max(max(f) for f in frames), sum(w * h for w, h in frames))
    buffer = io.BytesIO()  # and a GIF as Pillow writes it, with a global colour table
    Image.fromarray(np.zeros((30, 70), np.uint8)).save(buffer, format="GIF")
    assert [int(v) for v in preprocessing.gif_frames(tf.constant(buffer.getvalue()))] == [1, 70, 2100]


@pytest.mark.parametrize("frames", [[(8000, 8000)], [(4096, 4096)] * 60], ids=["one-huge-frame", "60-frames"])
def test_a_gif_whose_frames_exceed_the_limits_is_refused_before_decoding(frames):
    """A 16x16 logical screen passed the header check while a frame declared 8000x8000 (+252 MB decoded),
    and 60 frames of 4096x4096 in 1.6 MB cost +969 MB."""
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"GIF declares \d+ frame\(s\)"):
        run(_gif((16, 16), frames))


def test_a_png_chunk_longer_than_the_file_is_refused_before_decoding(digit):
    """A 1 KB PNG whose tEXt chunk declared 2^31 - 1 bytes made the decoder allocate 2 GB before it gave up."""
    image, _ = digit
    good = encode(image, "PNG")

    def chunk(kind: bytes, body: bytes, declared: int) -> bytes:
        return struct.pack(">I", declared) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    text = b"Comment\0written on a tablet"
    honest = good[:33] + chunk(b"tEXt", text, len(text)) + good[33:]  # after IHDR, as encoders put it
    np.testing.assert_array_equal(run(honest), run(good))
    with pytest.raises(tf.errors.InvalidArgumentError, match="PNG chunk declares"):
        run(good[:33] + chunk(b"tEXt", text, 2**31 - 1) + good[33:])
    # The walk ends at IEND: what follows it, as some tools append, is not read as chunks.
    np.testing.assert_array_equal(run(good + chunk(b"tEXt", text, 2**31 - 1)), run(good))
    # 12-byte empty chunks by the hundred thousand would keep the walk going for seconds: refused by count.
    flood = good[:33] + chunk(b"tEXt", b"", 0) * (preprocessing.MAX_PNG_CHUNKS + 1) + good[33:]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more than {preprocessing.MAX_PNG_CHUNKS} chunks"):
        run(flood)
    # A file of zeros after the signature has no chunk type: left to the decoder, which refuses it.
    with pytest.raises(tf.errors.InvalidArgumentError):
        run(b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20))


def test_a_jpeg_of_more_scans_than_allowed_is_refused_before_decoding(digit):
    """libjpeg decodes a progressive JPEG scan by scan: its last scan repeated 1,000 times took 11 s."""
    image, _ = digit
    buffer = io.BytesIO()
    Image.fromarray(np.kron(255 - image, np.ones((8, 8), np.uint8))).save(buffer, "JPEG", progressive=True)
    progressive = buffer.getvalue()
    scans = progressive.count(b"\xff\xda")
    assert 1 < scans < preprocessing.MAX_JPEG_SCANS
    assert run(progressive).shape == (1, 28, 28, 1)  # a progressive JPEG as encoders write it is read
    last, end = progressive.rindex(b"\xff\xda"), progressive.rindex(b"\xff\xd9")
    repeated = progressive[:end] + progressive[last:end] * (preprocessing.MAX_JPEG_SCANS + 1 - scans) + b"\xff\xd9"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"JPEG holds {preprocessing.MAX_JPEG_SCANS + 1} scans; the limit is"):
        run(repeated)


def test_formats_whose_size_is_not_read_are_refused_unread():
    jxl = b"\xff\x0a" + bytes(64)  # a JPEG XL codestream's signature (TF 2.21 decodes JPEG XL)
    with pytest.raises(tf.errors.InvalidArgumentError, match="PNG, JPEG, GIF, BMP or WebP expected"):
        run(jxl)


@pytest.mark.parametrize("payload,message", [
    (b"", "empty"),
    (b"hello, this is text", "Unknown image file format"),
    (bytes(range(256)) * 4, "Unknown image file format"),
    (png_declaring(28, 28)[:40], "PNG"),
])
def test_what_is_not_an_image_is_an_invalid_argument(payload, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(payload)


def _mnist_like(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(out - expected).mean())


def test_mnist_digits_pass_through_the_normalisation_unchanged(mnist_test_arrays):
    images = mnist_test_arrays[0][:100]
    out = run(*[encode(image[:, :, 0], "PNG") for image in images])
    diffs = np.abs(out - images.astype(np.float32) / 255.0).mean(axis=(1, 2, 3))
    assert np.median(diffs) < 1e-4 and diffs.mean() < 0.005  # MNIST was made this way already


def test_off_centre_dark_digit_on_a_transparent_canvas_comes_out_centred(digit):
    image, expected = digit
    canvas = np.zeros((200, 300, 4), np.uint8)  # 300 wide, 200 high, fully transparent
    big = np.kron(image, np.ones((4, 4), np.uint8))  # 112x112 digit
    canvas[20:132, 170:282, 3] = big  # dark (black) ink, opaque only where the digit is, top right
    out = run(encode(canvas, "PNG", "RGBA"))[0]
    assert out.shape == (28, 28, 1)
    assert _mnist_like(out, expected) < 0.08  # resampled twice (4x up, then down): a little softer
    ys = np.arange(28) + 0.5
    mass = out[:, :, 0].sum()
    assert abs((out[:, :, 0] * ys[:, None]).sum() / mass - 14.5) < 1.0
    assert abs((out[:, :, 0] * ys[None, :]).sum() / mass - 14.5) < 1.0
    assert out[0].max() == 0 and out[-1].max() == 0  # a black border: white digit on black


def test_faint_pencil_on_grey_paper_is_stretched_to_black_and_white(digit):
    image, expected = digit
    paper = (180 - image.astype(np.float32) * 60 / 255).astype(np.uint8)  # ink only 60 levels darker
    out = run(encode(np.kron(paper, np.ones((3, 3), np.uint8)), "PNG"))[0]
    assert out.max() == pytest.approx(1.0) and _mnist_like(out, expected) < 0.05


@pytest.mark.parametrize("background", [100, 128, 160])
def test_white_chalk_on_a_grey_board_is_read_as_it_is_whichever_side_of_mid_grey(digit, background):
    """MNIST-C's brightness (a background of 128 under white ink) was inverted into "no ink" when polarity
    was decided against mid-grey."""
    image, expected = digit
    board = np.maximum(image, background).astype(np.uint8)  # white ink on a grey board: faint edges lost
    out = run(encode(board, "PNG"))[0]
    assert _mnist_like(out, expected) < 0.06 and np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("paper", [90, 128, 200])
def test_dark_pencil_on_grey_paper_is_inverted_whichever_side_of_mid_grey(digit, paper):
    image, expected = digit
    sheet = (paper - image.astype(np.float32) * (paper - 20) / 255).astype(np.uint8)  # ink darker than paper
    out = run(encode(sheet, "PNG"))[0]
    assert _mnist_like(out, expected) < 0.02


def test_a_speck_of_noise_does_not_move_or_shrink_the_digit(digit):
    image, _ = digit
    page = np.full((120, 120), 255, np.uint8)
    page[30:86, 30:86] = 255 - np.kron(image, np.ones((2, 2), np.uint8))
    clean = run(encode(page, "PNG"))[0]
    page[5, 110] = 0  # one black pixel far from the digit
    np.testing.assert_allclose(run(encode(page, "PNG"))[0], clean, atol=1e-6)


@pytest.mark.parametrize("shade", [0, 128, 255])
def test_a_blank_image_is_refused_as_having_no_ink(shade):
    with pytest.raises(tf.errors.InvalidArgumentError, match="no ink found"):
        run(encode(np.full((40, 60), shade, np.uint8), "PNG"))


def test_too_little_contrast_is_refused_as_having_no_ink():
    faint = np.full((40, 40), 200, np.uint8)
    faint[10:30, 18:22] = 190  # a stroke 10 levels darker than the paper: below MIN_CONTRAST
    with pytest.raises(tf.errors.InvalidArgumentError, match="no ink found"):
        run(encode(faint, "PNG"))


def _box(out: np.ndarray) -> tuple[int, int]:
    """(height, width) of what is inked in a normalised 28x28 output."""
    rows, cols = np.nonzero(out[:, :, 0] > preprocessing.INK_THRESHOLD)
    return rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()


def _on_page(image: np.ndarray) -> np.ndarray:
    """The digit, 2x, black on a white 120x120 page."""
    page = np.full((120, 120), 255, np.uint8)
    page[30:86, 30:86] = 255 - np.kron(image, np.ones((2, 2), np.uint8))
    return page


def test_a_digit_written_on_ruled_paper_reads_as_on_plain_paper(digit):
    image, _ = digit
    plain = _on_page(image)
    ruled = plain.copy()
    lines = np.arange(120) % 16 < 2  # grey lines 2 px thick every 16 px, under the ink
    ruled[lines] = np.minimum(ruled[lines], 170)
    clean, out = run(encode(plain, "PNG"), encode(ruled, "PNG"))
    assert _box(out) == _box(clean)
    assert _mnist_like(out, clean) < 0.03


def test_occluding_bars_leave_the_digit_its_size_and_place(digit):
    image, _ = digit
    barred = image.copy()
    barred[np.arange(28) % 7 < 2] = 51  # 20% grey bars painted over the digit, across the image
    clean, out = run(encode(image, "PNG"), encode(barred, "PNG"))
    inked_rows = (out[:, :, 0] > preprocessing.INK_THRESHOLD).mean(axis=1)
    assert inked_rows.max() < 0.6  # no bar is left across the image
    assert _box(out)[0] >= _box(clean)[0] - 4  # not shrunk to fit the bars (the bars cut its top row or two)
    assert np.corrcoef(out.ravel(), clean.ravel())[0, 1] > 0.6  # the same digit, with gaps


def test_gaussian_noise_does_not_widen_the_ink_box(digit):
    image, _ = digit
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 51, image.shape), 0, 255).astype(np.uint8)
    clean, out = run(encode(image, "PNG"), encode(noisy, "PNG"))
    assert abs(_box(out)[0] - _box(clean)[0]) <= 2


def test_a_stroke_from_edge_to_edge_is_kept_when_it_is_all_there_is():
    one = np.zeros((28, 28), np.uint8)
    one[:, 12:16] = 255  # a tightly cropped "1": a line from edge to edge, but the only ink
    out = run(encode(one, "PNG"))[0]
    assert _box(out)[0] == 20 and out.max() == pytest.approx(1.0)


def test_a_white_digit_between_white_bands_is_read_white_on_black(digit):
    """MNIST-C's stripe: the 7 outermost columns on each side inverted. Three quarters of the border is white,
    so the border's median called the image black ink on white paper and the digit came out inverted (21% of
    MNIST-C's stripes read right)."""
    image, _ = digit
    striped = image.copy()
    striped[:, :7] = 255 - striped[:, :7]
    striped[:, -7:] = 255 - striped[:, -7:]
    clean, out = run(encode(image, "PNG"), encode(striped, "PNG"))
    assert out[:, :, 0].mean() < 0.3  # white ink on black, not a white block
    assert np.corrcoef(out.ravel(), clean.ravel())[0, 1] > 0.6  # the same digit, less what the bands cut


def test_a_sheet_photographed_on_a_dark_table_reads_as_on_plain_paper(digit):
    image, _ = digit
    plain = _on_page(image)
    photo = plain.copy()
    photo[:, :14] = 40  # the table at both sides of the sheet
    photo[:, -10:] = 60
    clean, out = run(encode(plain, "PNG"), encode(photo, "PNG"))
    assert _box(out) == _box(clean)
    assert _mnist_like(out, clean) < 0.03


def test_a_digit_in_a_shadow_that_darkens_the_paper_across_the_page_reads_as_on_plain_paper(digit):
    """Paper from white on the left to dark grey on the right, darker there than the ink is on the left:
    one background level for the whole image took the shadowed paper for ink (MNIST-C's fog read 92%)."""
    image, _ = digit
    plain = _on_page(image).astype(np.float32)
    light = np.linspace(1.0, 0.35, plain.shape[1])[None, :]  # the light falls off across the page
    shadowed = np.clip(plain * light, 0, 255).astype(np.uint8)
    clean, out = run(encode(plain.astype(np.uint8), "PNG"), encode(shadowed, "PNG"))
    assert abs(_box(out)[0] - _box(clean)[0]) <= 1 and abs(_box(out)[1] - _box(clean)[1]) <= 2
    assert np.corrcoef(out.ravel(), clean.ravel())[0, 1] > 0.9


def test_a_bar_along_one_edge_is_kept_as_part_of_the_digit():
    seven = np.zeros((28, 28), np.uint8)
    seven[:4, :] = 255  # a tightly cropped 7: its bar runs along the top edge ...
    for row in range(4, 28):
        seven[row, max(0, 24 - row):max(0, 24 - row) + 4] = 255  # ... and its stem down to the left
    out = run(encode(seven, "PNG"))[0, :, :, 0]
    inked = out > preprocessing.INK_THRESHOLD
    assert inked[inked.any(axis=1)][0].sum() >= 10  # the top row of the ink is still the bar


def test_a_batch_is_normalised_exactly_as_each_of_its_images_alone(mnist_test_arrays):
    """The noise augmentation normalises batches; serving one image at a time: the two must not differ, also
    when some images of the batch are inverted, ruled, barred or noisy and others are not."""
    images = mnist_test_arrays[0][:12, :, :, 0].copy()
    images[1] = 255 - images[1]  # black on white
    images[0, np.arange(28) % 7 < 2] = 51  # bars across: only this one has lines to remove
    images[3, :, np.arange(28) % 9 < 1] = np.maximum(images[3, :, np.arange(28) % 9 < 1], 90)
    images[4] = np.clip(images[4] + np.random.default_rng(0).normal(0, 51, (28, 28)), 0, 255)
    images[5] = images[5] // 3 + 60  # faint on grey
    grey = tf.constant(images[..., None].astype(np.float32) / 255.0)
    batch = preprocessing.normalize_batch(grey).numpy()
    alone = np.concatenate([preprocessing.normalize_batch(image[None]).numpy() for image in grey])
    np.testing.assert_array_equal(batch, alone)
    assert (batch[0, :, :, 0] > preprocessing.INK_THRESHOLD).mean(axis=1).max() < 0.6  # its bars were removed


def test_a_call_of_same_size_pngs_answers_exactly_what_each_alone_answers(mnist_test_arrays):
    """decode_batch normalises a call of PNGs of one size together (the fast path) and anything else image by
    image: the answers must not depend on which, for digits as they come and as people send them."""
    rng = np.random.default_rng(1)
    digits = mnist_test_arrays[0][:40, :, :, 0]
    variants = [
        lambda d: d, lambda d: 255 - d,  # white on black, black on white
        lambda d: np.where(np.arange(28)[:, None] % 7 < 2, np.maximum(d, 51), d),  # bars across
        lambda d: np.clip(d + rng.normal(0, 51, d.shape), 0, 255),  # noise
        lambda d: d // 3 + 60,  # faint on grey
        lambda d: np.minimum(255 - d, np.where(np.arange(28)[:, None] % 9 < 1, 170, 255)),  # ruled paper
    ]
    grey = [encode(variants[i % len(variants)](d).astype(np.uint8), "PNG") for i, d in enumerate(digits)]
    rgba = []
    for d in digits[:12]:  # a dark digit on a transparent canvas, 2x
        canvas = np.zeros((56, 56, 4), np.uint8)
        canvas[..., 3] = np.kron(d, np.ones((2, 2), np.uint8))
        rgba.append(encode(canvas, "PNG", "RGBA"))
    pages = [encode(_on_page(d), "PNG") for d in digits[:8]]  # 120x120 pages
    bmp = encode(digits[0], "BMP")  # in a call with a BMP, each PNG takes the image-by-image path
    for files in (grey, rgba, pages):
        together = run(*files)
        np.testing.assert_array_equal(together, np.concatenate([run(f) for f in files]))
        np.testing.assert_array_equal(together, np.concatenate([run(f, bmp)[:1] for f in files]))


def test_a_call_of_same_size_pngs_larger_than_one_batch_goes_through_in_batches(mnist_test_arrays, monkeypatch):
    """A call of same-size PNGs of more than BATCHED_PIXELS pixels in all is normalised in batches of at most that
    many (here 3 digits a batch: 3 + 3 + 2), not image by image: the same answers, in order."""
    files = [encode(d, "PNG") for d in mnist_test_arrays[0][:8, :, :, 0]]
    alone = np.concatenate([run(f) for f in files])
    sizes, normalize_batch = [], preprocessing.normalize_batch

    def noting_sizes(grey):  # notes each batch's size when the graph runs it
        tf.py_function(lambda n: sizes.append(int(n)), [tf.shape(grey)[0]], Tout=[])
        return normalize_batch(grey)

    monkeypatch.setattr(preprocessing, "BATCHED_PIXELS", 3 * 28 * 28)
    monkeypatch.setattr(preprocessing, "normalize_batch", noting_sizes)
    in_batches = tf.function(preprocessing.decode_batch, input_signature=[tf.TensorSpec([None], tf.string)])
    np.testing.assert_array_equal(in_batches(tf.constant(files)).numpy(), alone)
    assert sizes == [3, 3, 2]


def _reference_fit_and_centre(ink, top, left, height, width):
    """The crop, resize and centring as the graph did them before issue 15, one image at a time through
    TensorFlow's resize kernels (ResizeArea, ResizeBilinear) and pad_to_bounding_box."""
    def one(args):
        image, top, left, height, width = args
        crop = image[top:top + height, left:left + width]
        scale = preprocessing.DIGIT_BOX / tf.cast(tf.maximum(height, width), tf.float32)
        size = tf.maximum(1, tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale), tf.int32))
        digit = tf.cond(scale < 1.0, lambda: tf.image.resize(crop, size, method="area"),
                        lambda: tf.image.resize(crop, size, method="bilinear"))
        digit = tf.clip_by_value(digit, 0.0, 1.0)
        mass = tf.maximum(tf.reduce_sum(digit), 1e-6)
        centre_y = tf.reduce_sum(digit[:, :, 0] * (tf.range(size[0], dtype=tf.float32)[:, None] + 0.5)) / mass
        centre_x = tf.reduce_sum(digit[:, :, 0] * (tf.range(size[1], dtype=tf.float32)[None, :] + 0.5)) / mass
        side = preprocessing.IMAGE_SIZE
        offset_y = tf.clip_by_value(tf.cast(tf.round(side / 2 + 0.5 - centre_y), tf.int32), 0, side - size[0])
        offset_x = tf.clip_by_value(tf.cast(tf.round(side / 2 + 0.5 - centre_x), tf.int32), 0, side - size[1])
        return tf.image.pad_to_bounding_box(digit, offset_y, offset_x, side, side)
    return tf.map_fn(one, (ink, top, left, height, width),
                     fn_output_signature=tf.TensorSpec([preprocessing.IMAGE_SIZE] * 2 + [1], tf.float32))


def test_an_image_within_the_working_size_is_not_resampled_but_copied_bit_for_bit():
    """_shrink skips the area resize of an image it would not shrink: the same floats as the resize."""
    rng = np.random.default_rng(5)
    for height, width, channels in [(1, 1, 4), (28, 28, 4), (17, 23, 3), (preprocessing.WORK_SIDE, 40, 4),
                                    (300, 200, 4)]:
        pixels = tf.constant(rng.integers(0, 256, (2, height, width, channels), dtype=np.uint8))
        scale = min(1.0, preprocessing.WORK_SIDE / max(height, width))
        size = [max(1, int(np.ceil(height * scale))), max(1, int(np.ceil(width * scale)))]
        expected = tf.image.resize(pixels, size, method="area") / 255.0
        np.testing.assert_array_equal(preprocessing._shrink(pixels), expected)


def test_the_3x3_means_are_tensorflows_average_pooling_to_the_last_bit():
    """_mean3x3 pools with the images as channels (faster with oneDNN): the floats of avg_pool2d on each image."""
    rng = np.random.default_rng(6)
    for shape in [(1, 28, 28), (64, 28, 28), (3, 120, 57), (2, 1, 1), (5, 2, 30)]:
        x = rng.random(shape).astype(np.float32) ** 3
        for values in (x, (x > 0.1).astype(np.float32)):
            expected = tf.nn.avg_pool2d(values[..., None], 3, 1, "SAME")[..., 0]
            np.testing.assert_array_equal(preprocessing._mean3x3(tf.constant(values)), expected)


def test_the_image_graph_runs_without_logging_errors(digit, capfd):
    """TensorFlow logs errors the graph can cause to stderr, where a server's operator reads them as faults:
    grappler could not sort the graph in topological order when the image-by-image path decoded a PNG through
    the batch decoder's map_fn inside its own (two ERROR lines at the first call of every process, TF Serving's
    too, and that optimisation skipped); oneDNN logged one for a transpose of booleans."""
    image, _ = digit
    graph = tf.function(preprocessing.decode_batch, input_signature=[tf.TensorSpec([None], tf.string)],
                        autograph=False)  # a new trace: grappler optimises it at its first call
    png, jpeg = encode(image, "PNG"), encode(np.stack([image] * 3, axis=-1), "JPEG")
    for files in ([png], [png] * 64, [png, jpeg]):  # every path: one PNG, a batch, image by image
        assert graph(tf.constant(files)).shape == (len(files), 28, 28, 1)
    errors = [line for line in capfd.readouterr().err.splitlines() if re.match(r"E\d{4} ", line)]
    assert not errors


def test_the_crop_and_resize_of_a_batch_is_tensorflows_resize_of_each_box():
    """fit_and_centre resizes every box of a batch with two matrix products: the same pixels as the resize
    kernels, for boxes shrunk (area) and enlarged (bilinear), square, tall, wide, one pixel, whole image."""
    rng = np.random.default_rng(3)
    for height, width in [(28, 28), (56, 56), (120, 120), (256, 200), (13, 40), (7, 5), (256, 31)]:
        ink = tf.constant(rng.random((24, height, width, 1)).astype(np.float32) ** 3)
        top, left = rng.integers(0, height, 24), rng.integers(0, width, 24)
        box_height = np.maximum(1, (rng.random(24) * (height - top)).astype(int))
        box_width = np.maximum(1, (rng.random(24) * (width - left)).astype(int))
        top[0], left[0], box_height[0], box_width[0] = 0, 0, height, width
        top[1], left[1], box_height[1], box_width[1] = height // 2, width // 2, 1, 1
        boxes = [tf.constant(v, tf.int32) for v in (top, left, box_height, box_width)]
        np.testing.assert_allclose(preprocessing.fit_and_centre(ink, *boxes),
                                   _reference_fit_and_centre(ink, *boxes), atol=1e-6)


def _varied_files(digits: np.ndarray) -> list[bytes]:
    """A few hundred files as people send them: sizes from 17x23 to 300x200, five formats, either polarity,
    transparency, ruled paper, bars, noise, faint pencil, a shadow."""
    rng = np.random.default_rng(7)
    rows = np.arange(28)[:, None]
    variants = [
        lambda d: d, lambda d: 255 - d, lambda d: np.where(rows % 7 < 2, np.maximum(d, 51), d),
        lambda d: np.clip(d + rng.normal(0, 40, d.shape), 0, 255), lambda d: d // 3 + 60,
        lambda d: np.minimum(255 - d, np.where(rows % 9 < 1, 170, 255)),
    ]
    files = []
    for i, d in enumerate(digits):
        kind = i % 10
        image = variants[i % len(variants)](d.astype(np.float64)).astype(np.uint8)
        if kind < 3:
            files.append(encode(image, ("PNG", "BMP", "WEBP")[kind]))
        elif kind == 3:
            files.append(encode(np.kron(image, np.ones((3, 3), np.uint8)), "JPEG"))
        elif kind == 4:
            files.append(encode(image, "GIF"))
        elif kind == 5:  # a dark digit on a transparent canvas
            canvas = np.zeros((56, 56, 4), np.uint8)
            canvas[..., 3] = np.kron(d, np.ones((2, 2), np.uint8))
            files.append(encode(canvas, "PNG", "RGBA"))
        elif kind == 6:  # on a ruled page
            page = _on_page(d)
            page[np.arange(120) % 12 == 0] = 170
            files.append(encode(page, "PNG"))
        elif kind == 7:  # tightly cropped, off-size
            files.append(encode(np.ascontiguousarray(image[3:26, 5:22]), "PNG"))
        elif kind == 8:  # a large photo-like page, the paper darker to one side
            page = np.pad(np.kron(255 - d, np.ones((6, 6), np.uint8)).astype(np.float64), ((66, 66), (16, 16)),
                          constant_values=255)  # 300x200
            files.append(encode((page * np.linspace(0.6, 1.0, 200)[None, :]).astype(np.uint8), "PNG"))
        else:
            files.append(encode(image, "PNG"))
    return files


def test_a_few_hundred_varied_images_get_the_answers_of_the_image_by_image_graph(
        mnist_test_arrays, model_base_path, monkeypatch):
    """The batched graph against the graph before issue 15 (each image alone, the crop and resize through
    TensorFlow's kernels): the same digit, probabilities within 1e-4, on calls as clients and server-side
    batching make them (same-size PNGs together, anything mixed) and on each file alone."""
    digits = mnist_test_arrays[0][:300, :, :, 0]
    files = _varied_files(digits)
    same_size = [f for f, d in zip(files, range(300)) if d % 10 in (0, 9)]  # 28x28 PNGs
    new = np.concatenate([run(*files[:50]), run(*same_size), *(run(f) for f in files[50:])])
    reference_files = files[:50] + same_size + files[50:]
    monkeypatch.setattr(preprocessing, "fit_and_centre", _reference_fit_and_centre)
    def alone(file):  # each file decoded and normalised on its own, as the graph did before issue 15
        return preprocessing.normalize_batch(preprocessing.to_grey(preprocessing.decode_rgba(file[None])))[0]

    before = tf.function(lambda f: tf.map_fn(alone, f, fn_output_signature=tf.TensorSpec(
        [preprocessing.IMAGE_SIZE] * 2 + [1], tf.float32)), input_signature=[tf.TensorSpec([None], tf.string)])
    old = before(tf.constant(reference_files)).numpy()
    np.testing.assert_allclose(new, old, atol=1e-5)
    network = tf.saved_model.load(str(model_base_path / "1")).signatures["predict_pixels"]
    new_p, old_p = (network(pixels=tf.constant(x))["probabilities"].numpy() for x in (new, old))
    np.testing.assert_array_equal(new_p.argmax(axis=1), old_p.argmax(axis=1))
    np.testing.assert_allclose(new_p, old_p, atol=1e-4)


def test_a_blank_image_in_a_batch_fails_the_batch_with_the_same_message():
    grey = tf.constant(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="no ink found"):
        preprocessing.normalize_batch(grey)
