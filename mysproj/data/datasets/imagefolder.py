"""`<split>/<class>/<file>`: PlantDoc, DermNet and any user dataset in the ImageFolder layout."""

from __future__ import annotations

from collections import defaultdict

from mysproj.data.datasets import Candidate, Listing
from mysproj.data.labels import normalise_label
from mysproj.errors import BadInput
from mysproj.storage import exists, join, list_dirs, list_files


def scan_folders(source: str, splits: dict[str, str], underscores: str) -> Listing:
    """Every file below `<source>/<folder>/<class>/` for each split -> folder name in `splits`."""
    if not exists(source):
        raise BadInput(f"source {source} does not exist; pass --source with the dataset root")
    listing = Listing()
    folders_of: dict[str, set[str]] = defaultdict(set)  # label -> class folders that map to it
    for split, folder in splits.items():
        split_uri = join(source, folder)
        files = list_files(split_uri)
        class_dirs = [d for d in list_dirs(split_uri) if not d.startswith(".")]
        if not files and not class_dirs:
            raise BadInput(f"split folder {split_uri} is missing or empty; expected {folder}/<class>/<image files> "
                           f"below {source}")
        by_class: dict[str, list[str]] = defaultdict(list)
        for rel in files:
            parts = rel.split("/")
            if len(parts) < 2:
                listing.skip(split, join(split_uri, rel), "not inside a class folder")
            elif any(p.startswith(".") for p in parts):
                listing.skip(split, join(split_uri, rel), "hidden file")
            else:
                by_class[parts[0]].append(rel)
        for d in class_dirs:
            if d not in by_class:
                raise BadInput(f"class folder {join(split_uri, d)} holds no files; remove it or add its images")
        for class_dir, rels in sorted(by_class.items()):
            label = normalise_label(class_dir, underscores)
            if not label:
                raise BadInput(f"class folder {join(split_uri, class_dir)}: its name gives an empty label")
            folders_of[label].add(class_dir)
            listing.declared.setdefault(label, join(split_uri, class_dir))
            for rel in rels:
                listing.candidates.append(Candidate(split, join(split_uri, rel), label, f"{folder}/{rel}"))
    merged = {label: sorted(dirs) for label, dirs in folders_of.items() if len(dirs) > 1}
    if merged:
        listing.notes["merged_class_folders"] = merged
    return listing


def scan(cfg, out) -> Listing:
    return scan_folders(cfg.source, {"train": cfg.train_split, "test": cfg.test_split}, cfg.label_underscores)
