"""DTD (v1.0.1 tarball, `dtd/`): `images/<class>/<class>_<NNNN>.jpg` and split files `labels/{train,test}<N>.txt`
holding one path relative to `images/` per line (e.g. `banded/banded_0002.jpg`). The paper uses split 1.
The source may be the `dtd/` folder itself or the folder the tarball was unpacked into."""

from __future__ import annotations

from collections import defaultdict

from mysproj.data.datasets import Candidate, Listing, descend, safe_relpath
from mysproj.data.labels import normalise_label
from mysproj.errors import BadInput
from mysproj.storage import exists, join, list_dirs, list_files, read_text


def scan(cfg, out) -> Listing:
    if not exists(cfg.source):
        raise BadInput(f"source {cfg.source} does not exist; pass --source with the DTD root (the dtd/ folder)")
    root = descend(cfg.source, "labels")
    images = join(root, "images")
    present = set(list_files(images))
    per_class: dict[str, int] = defaultdict(int)
    for rel in present:
        per_class[rel.split("/")[0]] += 1
    for d in list_dirs(images):
        if not d.startswith(".") and d not in per_class:
            raise BadInput(f"class folder {join(images, d)} holds no files; remove it or restore its images")

    listing = Listing()
    for split in ("train", "test"):
        split_file = join(root, "labels", f"{split}{cfg.dtd_split}.txt")
        if not exists(split_file):
            raise BadInput(f"split file {split_file} is missing; DTD needs labels/train{cfg.dtd_split}.txt and "
                           f"labels/test{cfg.dtd_split}.txt (or pick another --dtd-split)")
        seen: set[str] = set()
        for n, line in enumerate(read_text(split_file).splitlines(), 1):
            if not line.strip():
                continue
            rel = safe_relpath(line, f"{split_file} line {n}")
            if "/" not in rel:
                raise BadInput(f"{split_file} line {n}: {line.strip()!r} has no class folder; expected "
                               f"<class>/<file> relative to images/")
            if rel in seen:
                listing.skip(split, join(images, rel), "listed twice in the split file")
                continue
            seen.add(rel)
            class_dir = rel.split("/")[0]
            label = normalise_label(class_dir, cfg.label_underscores)
            listing.declared.setdefault(label, f"{split_file} (class folder {class_dir})")
            if rel not in present:
                listing.skip(split, join(images, rel), f"listed in {split}{cfg.dtd_split}.txt but missing")
                continue
            listing.candidates.append(Candidate(split, join(images, rel), label, f"images/{rel}"))
    listing.notes["split_files"] = [f"labels/train{cfg.dtd_split}.txt", f"labels/test{cfg.dtd_split}.txt"]
    return listing
