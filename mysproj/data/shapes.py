"""The paper's four datasets at their real sizes, in their real layouts, with generated photo-like JPEGs: the
fixtures of the whole-job benchmark (`mysproj bench pipeline`). Each dataset's shape (classes, split sizes, image
sides, layout) is in its record (`mysproj.config.datasets`, `mysproj.config.dataset_shapes`).

Images are random crops, zooms, flips and tints of the photos that ship inside scikit-image (the textures-mini
sources and its colour photos), at sizes within each dataset's range, saved as JPEG quality 90: decoding and
resizing them costs what the real photos cost.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image

from mysproj.config.dataset_shapes import Shape
from mysproj.config.datasets import RECORDS
from mysproj.data import layouts

__all__ = ["SHAPES", "Shape", "photo_jpeg", "write_dataset"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "brick", "grass", "gravel")


# Dataset name -> its fixture shape, from the dataset records.
SHAPES: dict[str, Shape] = {name: d.fixture for name, d in RECORDS.items() if d.fixture is not None}


@functools.cache
def _photo(name: str):
    from skimage import data  # noqa: PLC0415 - only the embedded texture photos

    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def photo_jpeg(n: int, sides: tuple[int, int] = (300, 640), seed: int = 0) -> bytes:
    """A photo-like JPEG for index `n`: a random crop of a scikit-image photo, zoomed, flipped and tinted, of a
    random size within `sides` (the same bytes for the same arguments)."""

    rng = np.random.default_rng([seed, n])
    src = _photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
    zoom = max(w / src.shape[1], h / src.shape[0]) * float(rng.uniform(1.0, 1.6))
    cw, ch = w / zoom, h / zoom  # the source region that becomes the image
    x, y = float(rng.uniform(0, src.shape[1] - cw)), float(rng.uniform(0, src.shape[0] - ch))
    img = Image.fromarray(src).resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    pixels = np.asarray(img, dtype=np.int16) * rng.integers(6, 13, size=3, dtype=np.int16) // 10
    pixels += rng.integers(-5, 6, size=pixels.shape, dtype=np.int16)  # sensor-like noise: photo-sized files
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_dataset(shape: Shape, root: str, *, classes: int | None = None, per_class: int | None = None,
                  workers: int | None = None, seed: int = 0) -> str:
    """Write `shape` in its dataset's layout under `root`; returns the URI prep's `source` takes."""
    counts = shape.counts(classes, per_class)
    image = functools.partial(photo_jpeg, sides=shape.sides, seed=seed)
    workers = os.cpu_count() or 1 if workers is None else workers
    if shape.layout == "dtd":
        return layouts.write_dtd(root, counts, image, workers=workers)
    if shape.layout == "crisismmd":
        rows = {split: [(None, c) for c, n in per.items() for _ in range(n)] for split, per in counts.items()}
        return layouts.write_crisismmd(root, rows, image, workers=workers)
    return layouts.write_imagefolder(root, counts, image, workers=workers)
