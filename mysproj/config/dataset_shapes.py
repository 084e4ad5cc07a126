"""The real sizes and layouts of the paper's four datasets: the fixtures the whole-job benchmark writes
(`mysproj.data.shapes.write_dataset`) and the item counts the run planner scales by. Each dataset's record
(`mysproj.config.datasets`) holds its shape. Class names are the real ones (the prompt lists them all, so its length
is the real one); where each size comes from: the comments below and docs/performance.md. No ML imports."""

from __future__ import annotations

from dataclasses import dataclass

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

@dataclass(frozen=True)
class Shape:
    dataset: str
    classes: tuple[str, ...]
    split_totals: dict            # split -> images (train and test; DTD also val)
    sides: tuple[int, int]        # image width and height drawn from this range, pixels
    train_only: tuple[str, ...] = ()
    layout: str = "imagefolder"   # the on-disk layout written: dtd, crisismmd or imagefolder (mysproj.data.layouts)

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



# DTD split 1: 40 train / 40 val / 40 test per class; images 300-640 px a side (the DTD paper).
DTD = Shape("dtd", DTD_CLASSES, {"train": 1880, "val": 1880, "test": 1880}, (300, 640), layout="dtd")
# PlantDoc (the repository at the pinned commit): 2,342 train over 28 folders, 236 test over 27; web photos of
# mixed size.
PLANTDOC = Shape("plantdoc", PLANTDOC_CLASSES, {"train": 2342, "test": 236}, (250, 1600),
                 train_only=("Tomato two spotted spider mites leaf",))
# DermNet (Kaggle): 15,557 train / 4,002 test over 23 classes; mostly 720 x ~480 px.
DERMNET = Shape("dermnet", DERMNET_CLASSES, {"train": 15557, "test": 4002}, (450, 720))
# CrisisMMD humanitarian, the paper's 4 classes: 10,461 images split as the full task's train:test
# (13,608:2,237); tweet photos of mixed size.
CRISISMMD = Shape("crisismmd", CRISISMMD_CLASSES, {"train": 8984, "test": 1477}, (300, 1200), layout="crisismmd")
