"""The paper's four datasets at their real sizes, in their real layouts, with generated photo-like JPEGs: the
fixtures of the whole-job benchmark (`mysproj bench pipeline`) and the item counts the run planner scales by.

Images are random crops, zooms, flips and tints of the photos that ship inside scikit-image (the textures-mini
sources and its colour photos), at sizes within each dataset's range, saved as JPEG quality 90: decoding and
resizing them costs what the real photos cost. Class names are the real ones (the prompt lists them all, so its
length is the real one). Sizes: see `SHAPES` and docs/performance.md for where each number comes from.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

from mysproj.data import layouts

DTD_CLASSES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
    "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
    "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained",
    "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged")
PLANTDOC_CLASSES = (
    "Apple Scab Leaf", "Apple leaf", "Apple rust leaf", "Bell_pepper leaf spot", "Bell_pepper leaf",
    "Blueberry leaf", "Cherry leaf", "Corn Gray leaf spot", "Corn leaf blight", "Corn rust leaf", "Peach leaf",
    "Potato leaf early blight", "Potato leaf late blight", "Raspberry leaf", "Soyabean leaf",
    "Squash Powdery mildew leaf", "Strawberry leaf", "Tomato Early blight leaf", "Tomato Septoria leaf spot",
    "Tomato leaf bacterial spot", "Tomato leaf late blight", "Tomato leaf mosaic virus", "Tomato leaf yellow virus",
    "Tomato leaf", "Tomato mold leaf", "grape leaf black rot", "grape leaf",
    "Tomato two spotted spider mites leaf")  # the last one: train only, as upstream
DERMNET_CLASSES = (
    "Acne and Rosacea Photos", "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions",
    "Atopic Dermatitis Photos", "Bullous Disease Photos", "Cellulitis Impetigo and other Bacterial Infections",
    "Eczema Photos", "Exanthems and Drug Eruptions", "Hair Loss Photos Alopecia and other Hair Diseases",
    "Herpes HPV and other STDs Photos", "Light Diseases and Disorders of Pigmentation",
    "Lupus and other Connective Tissue diseases", "Melanoma Skin Cancer Nevi and Moles",
    "Nail Fungus and other Nail Disease", "Poison Ivy Photos and other Contact Dermatitis",
    "Psoriasis pictures Lichen Planus and related diseases", "Scabies Lyme Disease and other Infestations and Bites",
    "Seborrheic Keratoses and other Benign Tumors", "Systemic Disease",
    "Tinea Ringworm Candidiasis and other Fungal Infections", "Urticaria Hives", "Vascular Tumors",
    "Vasculitis Photos", "Warts Molluscum and other Viral Infections")
CRISISMMD_CLASSES = ("affected_individuals", "infrastructure_and_utility_damage",
                     "rescue_volunteering_or_donation_effort", "vehicle_damage")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "brick", "grass", "gravel")


@dataclass(frozen=True)
class Shape:
    dataset: str
    classes: tuple[str, ...]
    split_totals: dict            # split -> images (train and test; DTD also val)
    sides: tuple[int, int]        # image width and height drawn from this range, pixels
    train_only: tuple[str, ...] = ()

    def counts(self, classes: int | None = None, per_class: int | None = None) -> dict[str, dict[str, int]]:
        """{split: {class: images}}: the real totals spread evenly over the classes, or the first `classes`
        classes and `per_class` images per class over all splits, in the real proportions of the splits."""
        names = self.classes[:classes] if classes else self.classes
        total = sum(self.split_totals.values())
        out = {}
        for split, n_split in self.split_totals.items():
            here = [c for c in names if split == "train" or c not in self.train_only]
            n = round(per_class * len(here) * n_split / total) if per_class else n_split
            n = max(n, len(here))  # every class keeps at least one image in every split it has
            out[split] = {c: n // len(here) + (1 if i < n % len(here) else 0) for i, c in enumerate(here)}
        return out

    def test_images(self, classes: int | None = None, per_class: int | None = None) -> int:
        return sum(self.counts(classes, per_class)["test"].values())

    def train_images(self, classes: int | None = None, per_class: int | None = None) -> int:
        return sum(self.counts(classes, per_class)["train"].values())


SHAPES = {
    # DTD split 1: 40 train / 40 val / 40 test per class; images 300-640 px a side (the DTD paper).
    "dtd": Shape("dtd", DTD_CLASSES, {"train": 1880, "val": 1880, "test": 1880}, (300, 640)),
    # PlantDoc (repo audit in spec §0): 2,342 train over 28 folders, 236 test over 27; web photos of mixed size.
    "plantdoc": Shape("plantdoc", PLANTDOC_CLASSES, {"train": 2342, "test": 236}, (250, 1600),
                      train_only=("Tomato two spotted spider mites leaf",)),
    # DermNet (Kaggle): 15,557 train / 4,002 test over 23 classes; mostly 720 x ~480 px.
    "dermnet": Shape("dermnet", DERMNET_CLASSES, {"train": 15557, "test": 4002}, (450, 720)),
    # CrisisMMD humanitarian, the paper's 4 classes: 10,461 images split as the full task's train:test
    # (13,608:2,237); tweet photos of mixed size.
    "crisismmd": Shape("crisismmd", CRISISMMD_CLASSES, {"train": 8984, "test": 1477}, (300, 1200)),
}


@functools.cache
def _photo(name: str):
    import numpy as np
    from skimage import data

    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def photo_jpeg(n: int, sides: tuple[int, int] = (300, 640), seed: int = 0) -> bytes:
    """A photo-like JPEG for index `n`: a random crop of a scikit-image photo, zoomed, flipped and tinted, of a
    random size within `sides` (the same bytes for the same arguments)."""
    import numpy as np
    from PIL import Image

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
    if shape.dataset == "dtd":
        return layouts.write_dtd(root, counts, image, workers=workers)
    if shape.dataset == "crisismmd":
        rows = {split: [(None, c) for c, n in per.items() for _ in range(n)] for split, per in counts.items()}
        return layouts.write_crisismmd(root, rows, image, workers=workers)
    return layouts.write_imagefolder(root, counts, image, workers=workers)
