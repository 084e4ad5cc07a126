"""DermNet (Kaggle shubhamgoel27/dermnet): `train/<Class Name>/<file>.jpg`, `test/<Class Name>/<file>.jpg`,
23 classes whose folder names become the labels as they are (e.g. "Eczema Photos", suffix kept as upstream)."""

from __future__ import annotations

from mysproj.data.datasets import Listing, descend
from mysproj.data.datasets.imagefolder import scan_folders


def scan(cfg, out) -> Listing:
    return scan_folders(descend(cfg.source, "train"), {"train": "train", "test": "test"}, cfg.label_underscores)
