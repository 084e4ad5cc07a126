"""textures-mini: the built-in demo set, cut from real photos that ship inside scikit-image (no download).

brick, grass and gravel are CC0 texture photos; `hubble_deep_field` (NASA, public domain) gives a fourth,
visually distinct texture, "star field". Each photo is cut into non-overlapping `patch_size` tiles, so no pixel
is in both splits; every class keeps as many tiles as the smallest photo gives, and a seeded shuffle puts a
quarter of them in test. The PNG tiles are written into the prep output under `images/` and listed in its
manifest; samples point at them there.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from mysproj.data.datasets import Candidate, Listing, absolute_uri
from mysproj.data.labels import normalise_label
from mysproj.errors import BadInput

# class folder name -> skimage.data loader
SOURCES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "star_field": "hubble_deep_field"}
TEST_FRACTION = 0.25


def _tiles(img, size: int) -> list[tuple[int, int]]:
    rows, cols = img.shape[0] // size, img.shape[1] // size
    return [(r, c) for r in range(rows) for c in range(cols)]


def scan(cfg, out) -> Listing:
    import skimage.data  # noqa: PLC0415 - only the embedded texture photos

    size = cfg.patch_size
    photos = {name: getattr(skimage.data, loader)() for name, loader in SOURCES.items()}
    per_class = min(len(_tiles(img, size)) for img in photos.values())
    if per_class < 2:
        raise BadInput(f"config field 'patch_size' = {size}: too large, each photo must give at least 2 tiles")
    listing = Listing()
    rng = random.Random(f"textures-mini:{cfg.seed}")
    n_test = max(1, round(per_class * TEST_FRACTION))
    for name, img in photos.items():
        tiles = _tiles(img, size)
        rng.shuffle(tiles)
        tiles = tiles[:per_class]
        label = normalise_label(name, cfg.label_underscores)
        listing.declared[label] = f"skimage.data.{SOURCES[name]}()"
        for split, chosen in (("test", tiles[:n_test]), ("train", tiles[n_test:])):
            for r, c in chosen[:cfg.max_per_class]:
                patch = np.ascontiguousarray(img[r * size:(r + 1) * size, c * size:(c + 1) * size])
                buf = io.BytesIO()
                Image.fromarray(patch).convert("RGB").save(buf, format="PNG")
                rel = f"images/{split}/{name}/{name}_r{r}c{c}.png"
                image = absolute_uri(out.write_bytes(rel, buf.getvalue()))
                listing.candidates.append(Candidate(split, image, label, rel))
    listing.notes["photos"] = {normalise_label(n, cfg.label_underscores): f"skimage.data.{s}()"
                               for n, s in SOURCES.items()}
    listing.notes["tiles_per_class"] = per_class
    return listing
