"""Build the real on-disk layouts of the paper's datasets (spec §0) in a temp dir, with small generated images
and a few corrupt / non-image files, for the prep tests."""

from __future__ import annotations

import io
import os
import random

from PIL import Image

TSV_HEADER = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text", "label_image",
              "label_text_image"]


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 7))  # distinct bytes per seed
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_image(path: str, seed: int, size: tuple[int, int] = (24, 16)) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(ext, "JPEG")
    return write(path, image_bytes(seed, fmt, size))


def write_truncated_jpeg(path: str, seed: int = 999) -> str:
    data = image_bytes(seed, "JPEG", (64, 64))
    return write(path, data[: len(data) // 2])


def make_dtd(root: str, classes=("banded", "blotchy", "zigzagged"), per_split: int = 3, split: int = 1) -> str:
    """`root/dtd/images/<class>/<class>_<NNNN>.jpg` and `labels/{train,val,test}<split>.txt`."""
    dtd = os.path.join(root, "dtd")
    lines = {"train": [], "val": [], "test": []}
    n = 0
    for cls in classes:
        for s in ("train", "val", "test"):
            for _ in range(per_split):
                n += 1
                rel = f"{cls}/{cls}_{n:04d}.jpg"
                write_image(os.path.join(dtd, "images", rel), n)
                lines[s].append(rel)
    for s, rels in lines.items():
        write(os.path.join(dtd, "labels", f"{s}{split}.txt"), ("\n".join(rels) + "\n").encode())
    return dtd


def make_imagefolder(root: str, layout: dict[str, dict[str, int]], ext: str = ".jpg") -> str:
    """`root/<split>/<class>/<file>`, `layout = {split: {class: count}}`."""
    n = 0
    for split, classes in layout.items():
        for cls, count in classes.items():
            for i in range(count):
                n += 1
                write_image(os.path.join(root, split, cls, f"img_{i}{ext}"), 1000 + n)
    return root


def make_crisismmd(root: str, rows: dict[str, list[tuple[str, str]]]) -> str:
    """`data_image/<event>/<date>/<tweet>_<n>.jpg` and the humanitarian split TSVs. `rows = {split: [(image rel
    path or None to generate, label_image)]}`; other label columns get a different value to prove the column
    choice matters."""
    n = 0
    for split in ("train", "dev", "test"):
        out = ["\t".join(TSV_HEADER)]
        for rel, label in rows.get(split, []):
            n += 1
            if rel is None:
                rel = f"data_image/hurricane_harvey/{10 + n % 3}_9_2017/{900000 + n}_0.jpg"
                write_image(os.path.join(root, rel), 5000 + n)
            text = f'Tweet "{n}" about the storm'
            out.append("\t".join(["hurricane_harvey", str(900000 + n), f"{900000 + n}_0", text, rel,
                                  label, "not_humanitarian", label, label]))
        write(os.path.join(root, "crisismmd_datasplit_all", f"task_humanitarian_text_img_{split}.tsv"),
              ("\n".join(out) + "\n").encode())
    return root
