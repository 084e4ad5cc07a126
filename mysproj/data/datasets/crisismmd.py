"""CrisisMMD v2.0, humanitarian task: images `data_image/<event>/<date>/<tweetid>_<n>.jpg`, split files
`crisismmd_datasplit_all/task_humanitarian_text_img_{train,test}.tsv` (tab-separated, header, 9 columns; `image`
is relative to the dataset root). The label column, a merge map and the kept class subset are options (docs/paper.md);
the default keeps the paper's 4 classes from `label_image`. The dev split is not used (the paper reports
train/test only)."""

from __future__ import annotations

import csv
import io
from collections import Counter

from mysproj.data.datasets import Candidate, Listing, descend, safe_relpath
from mysproj.data.labels import normalise_label
from mysproj.errors import BadInput
from mysproj.storage import exists, join, list_files, read_text

SPLIT_DIR = "crisismmd_datasplit_all"
SPLIT_FILES = {"train": "task_humanitarian_text_img_train.tsv", "test": "task_humanitarian_text_img_test.tsv"}


def _rows(split_file: str, label_column: str) -> list[tuple[int, dict]]:
    text = read_text(split_file)
    # Tweets hold stray quotes: read the TSV literally (no quoting), as it was written.
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header:
        raise BadInput(f"split file {split_file} is empty; expected a header row and one row per image")
    header = [h.strip() for h in header]
    for needed in ("image", label_column):
        if needed not in header:
            raise BadInput(f"split file {split_file}: no column '{needed}' in its header ({', '.join(header)}); "
                           f"check --crisismmd-label-column")
    rows = []
    for n, values in enumerate(reader, 2):
        if not any(v.strip() for v in values):
            continue
        rows.append((n, dict(zip(header, values)) if len(values) == len(header) else {}))
    return rows


def scan(cfg, out) -> Listing:
    if not exists(cfg.source):
        raise BadInput(f"source {cfg.source} does not exist; pass --source with the CrisisMMD root (holding "
                       f"data_image/ and {SPLIT_DIR}/)")
    root = descend(cfg.source, SPLIT_DIR)
    merge = {str(k): str(v) for k, v in cfg.crisismmd_merge.items()}
    keep = set(cfg.crisismmd_classes)
    present = set(list_files(root))
    listing = Listing()
    seen_labels: Counter = Counter()
    dropped: Counter = Counter()
    for split, name in SPLIT_FILES.items():
        split_file = join(root, SPLIT_DIR, name)
        if not exists(split_file):
            raise BadInput(f"split file {split_file} is missing; CrisisMMD needs {SPLIT_DIR}/{name}")
        seen: set[str] = set()
        for n, row in _rows(split_file, cfg.crisismmd_label_column):
            where = f"{split_file} line {n}"
            if not row:
                listing.skip(split, where, "malformed row (wrong number of columns)")
                continue
            rel = safe_relpath(row["image"], where)
            raw = row[cfg.crisismmd_label_column].strip()
            label = merge.get(raw, raw)
            if not label:
                listing.skip(split, where, f"empty '{cfg.crisismmd_label_column}' value")
                continue
            seen_labels[label] += 1
            if keep and label not in keep:
                dropped[label] += 1
                continue
            if rel in seen:
                listing.skip(split, join(root, rel), "listed twice in the split file")
                continue
            seen.add(rel)
            if rel not in present:
                listing.skip(split, join(root, rel), f"listed in {name} but missing")
                continue
            listing.candidates.append(Candidate(split, join(root, rel),
                                                normalise_label(label, cfg.label_underscores), rel))
    for cls in sorted(keep):
        if cls not in seen_labels:
            found = ", ".join(sorted(seen_labels)) or "none"
            raise BadInput(f"CrisisMMD class '{cls}' (crisismmd_classes) has no rows in column "
                           f"'{cfg.crisismmd_label_column}' after merging; labels found: {found}")
        listing.declared[normalise_label(cls, cfg.label_underscores)] = f"crisismmd_classes entry '{cls}'"
    listing.notes.update({"label_column": cfg.crisismmd_label_column, "merge": merge,
                          "classes_kept": sorted(keep) or "all",
                          "rows_of_other_classes": dict(sorted(dropped.items()))})
    return listing
