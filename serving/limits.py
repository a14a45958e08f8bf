"""Bounds on what one request may ask of the server, checked before it is batched or run.

The model's graph bounds each image (at most 4096 px a side, read from its header before decoding); nothing
in it bounds a request: 16 MB holds a thousand 16 KB PNGs that each declare 4096x4096, about 100 s of
decoding. The embedded server (not tensorflow_model_server, which has no such flags) refuses, with
INVALID_ARGUMENT / HTTP 400 and a message that says which bound and by how much:

- more than `--max_images_per_request` images: the elements of its string tensors (each an encoded image) or
  the batch dimension of its numeric ones;
- more than `--max_pixels_per_request` pixels in all, as the images' headers declare them (Pillow reads the
  header of each PNG, JPEG, GIF, BMP and WebP without decoding it; bytes it cannot read count nothing, and the
  graph refuses them).

Checked per request, before batching, so one request over a bound cannot fail a batch it would have joined.
0 turns a bound off.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from serving.errors import ServingError

# The formats the model's graph decodes (tf.io.decode_image); Pillow tries no other reader on the bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
DEFAULT_MAX_IMAGES = 4096
DEFAULT_MAX_PIXELS = 16 * 4096 * 4096  # sixteen images of the largest size the graph decodes


def declared_pixels(data: bytes) -> int:
    """Width x height as the image's header declares it; 0 for bytes Pillow cannot read as an image, and
    more than any bound for a header Pillow itself refuses as a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return 2**62
    except Exception:  # whatever Pillow makes of bad bytes, the graph gives the real error
        return 0
    return width * height


def _images(array: np.ndarray) -> int:
    if array.dtype == object or array.dtype.kind == "S":
        return int(array.size)
    return int(array.shape[0]) if array.ndim else 1


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raises INVALID_ARGUMENT when the request's inputs hold more images or pixels than allowed."""
        images = max((_images(array) for array in inputs.values()), default=0)
        if self.max_images and images > self.max_images:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request holds {images} images; the server takes at most {self.max_images} a "
                               "request (--max_images_per_request): split it")
        if not self.max_pixels:
            return
        pixels = 0
        for array in inputs.values():
            if array.dtype != object and array.dtype.kind != "S":
                continue
            for item in array.flat:
                pixels += declared_pixels(item) if isinstance(item, bytes) else 0
                if pixels > self.max_pixels:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"request's images declare more than {self.max_pixels} pixels in all "
                                       f"(--max_pixels_per_request): send fewer or smaller images a request")
