"""Build the real on-disk layouts of the paper's datasets (docs/paper.md) in a temp dir, with small generated images
and a few corrupt / non-image files, for the prep tests (the layout writers are the library's)."""

from __future__ import annotations

import io
import os
import random

from PIL import Image

from mysproj.data import layouts
from mysproj.data.layouts import write

_FORMATS = {".png": "PNG", ".bmp": "BMP"}


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 7))  # distinct bytes per seed
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: str, seed: int, size: tuple[int, int] = (24, 16)) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = _FORMATS.get(ext, "JPEG")
    return write(path, image_bytes(seed, fmt, size))


def write_truncated_jpeg(path: str, seed: int = 999) -> str:
    data = image_bytes(seed, "JPEG", (64, 64))
    return write(path, data[: len(data) // 2])


def make_dtd(root: str, classes=("banded", "blotchy", "zigzagged"), per_split: int = 3, split: int = 1) -> str:
    """`root/dtd/images/<class>/<class>_<NNNN>.jpg` and `labels/{train,val,test}<split>.txt`."""
    counts = {s: dict.fromkeys(classes, per_split) for s in ("train", "val", "test")}
    return layouts.write_dtd(root, counts, image_bytes, split)


def make_imagefolder(root: str, layout: dict[str, dict[str, int]], ext: str = ".jpg") -> str:
    """`root/<split>/<class>/<file>`, `layout = {split: {class: count}}`."""
    fmt = _FORMATS.get(ext.lower(), "JPEG")
    return layouts.write_imagefolder(root, layout, lambda n: image_bytes(1000 + n, fmt), ext)


def make_crisismmd(root: str, rows: dict[str, list[tuple[str, str]]]) -> str:
    """`data_image/<event>/<date>/<tweet>_<n>.jpg` and the humanitarian split TSVs. `rows = {split: [(image rel
    path or None to generate, label_image)]}`; other label columns get a different value to prove the column
    choice matters."""
    return layouts.write_crisismmd(root, rows, lambda n: image_bytes(5000 + n))
