"""Real photos (scikit-image's) as encoded files, for the tests of the image paths: `photos()` as RGB arrays,
`jpeg(...)` one encoded at a size and mode, `jpeg_folder(root)` an imagefolder source of JPEGs of every kind the
device decoder takes or hands to PIL."""

from __future__ import annotations

import io
import os


def photos() -> dict:
    """scikit-image's photos as RGB arrays (the textures are greyscale: repeated into three channels)."""
    import numpy as np
    from skimage import data as sk

    grey = {n: getattr(sk, n)() for n in ("brick", "grass", "gravel")}
    return {**{n: np.stack([a] * 3, axis=-1) for n, a in grey.items()}, "astronaut": sk.astronaut(),
            "coffee": sk.coffee()}


def jpeg(array, size: tuple[int, int], mode: str = "RGB", **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).resize(size, Image.BILINEAR).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def jpeg_folder(root) -> str:
    """An imagefolder source under `root`: RGB JPEGs (baseline, progressive, 4:4:4, several sizes and aspects) and,
    in the test split, a greyscale JPEG, a CMYK JPEG and a PNG, which decode=device hands to PIL. Returns its path."""
    from PIL import Image

    p = photos()
    files = {
        "test/brick": [("a.jpg", jpeg(p["brick"], (500, 375))), ("b.jpg", jpeg(p["brick"], (90, 130))),
                       ("grey.jpg", jpeg(p["brick"], (100, 100), mode="L"))],
        "test/coffee": [("a.jpg", jpeg(p["coffee"], (400, 300), progressive=True)),
                        ("cmyk.jpg", jpeg(p["coffee"], (160, 120), mode="CMYK")),
                        ("c.png", None)],
        "test/astronaut": [("a.jpg", jpeg(p["astronaut"], (256, 256), subsampling=0)),
                           ("b.jpg", jpeg(p["astronaut"], (300, 170)))],
        "train/brick": [("t.jpg", jpeg(p["brick"], (64, 64)))],
        "train/coffee": [("t.jpg", jpeg(p["coffee"], (64, 64)))],
        "train/astronaut": [("t.jpg", jpeg(p["astronaut"], (64, 64)))],
    }
    src = os.path.join(root, "src")
    for folder, items in files.items():
        os.makedirs(os.path.join(src, folder))
        for name, raw in items:
            path = os.path.join(src, folder, name)
            if raw is None:
                Image.fromarray(p["coffee"]).resize((130, 170)).save(path)
            else:
                with open(path, "wb") as f:
                    f.write(raw)
    return src
