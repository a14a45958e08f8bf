"""The bound on how many images one request may hold, checked before it is batched or run.

The model's graph bounds the pixels: each image at most 4096 px a side and all the images of a call at most
16 x 4096^2 pixels, read from their headers before anything is decoded (`training/preprocessing.py`,
`check_headers`), so TF Serving and this server refuse the same requests. What the graph cannot see is the
number of images, which costs before it runs (a tensor proto and an array of that many strings): more than
`--max_images_per_request` images (the elements of a request's string tensors, or the batch dimension of its
numeric ones) get INVALID_ARGUMENT / HTTP 400 with a message that says so. Not in tensorflow_model_server.
0 turns the bound off.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from serving.errors import ServingError

DEFAULT_MAX_IMAGES = 4096


def _images(array: np.ndarray) -> int:
    if array.dtype == object or array.dtype.kind == "S":
        return int(array.size)
    return int(array.shape[0]) if array.ndim else 1


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = DEFAULT_MAX_IMAGES

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raises INVALID_ARGUMENT when the request's inputs hold more images than allowed."""
        images = max((_images(array) for array in inputs.values()), default=0)
        if self.max_images and images > self.max_images:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request holds {images} images; the server takes at most {self.max_images} a "
                               "request (--max_images_per_request): split it")
