"""Writes MNIST test digits as PNG files, the kind of input a client sends: `<dir>/<index>_label<digit>.png`.

    python -m training.samples --out samples --count 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import data
from training.config import Config


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """uint8 [N, 28, 28, 1] -> PNG files' bytes, as a client would send them (lossless: the model decodes the
    digits' own pixels)."""
    return [tf.io.encode_png(image).numpy() for image in images]


def write_samples(out_dir: str | Path, count: int, data_dir: str = Config.data_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, label) in enumerate(data.load_split(Config(data_dir=data_dir, test_subset=count), "test")):
        path = out / f"{index:05d}_label{int(label)}.png"
        path.write_bytes(encode_pngs(image.numpy()[None])[0])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--data-dir", default=Config.data_dir)
    args = parser.parse_args(argv)
    paths = write_samples(args.out, args.count, args.data_dir)
    print(f"[samples] wrote {len(paths)} MNIST test digits as PNG files to {args.out}/")


if __name__ == "__main__":
    main()
