"""PlantDoc (github pratikkayal/PlantDoc-Dataset): `train/<Class Name>/<file>`, `test/<Class Name>/<file>`.

Folder names carry spaces and sometimes underscores; one class (`Tomato two spotted spider mites leaf`) exists
only in train: it is kept there and listed in the report (prep reports every class missing from a split).
Extensions vary and some files do not decode: prep skips and reports those.
"""

from __future__ import annotations

from mysproj.data.datasets import Listing, descend
from mysproj.data.datasets.imagefolder import scan_folders


def scan(cfg, out) -> Listing:
    return scan_folders(descend(cfg.source, "train"), {"train": "train", "test": "test"}, cfg.label_underscores)
