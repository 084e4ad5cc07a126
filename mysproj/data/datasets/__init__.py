"""One small reader per on-disk layout (docs/paper.md), named by the dataset's record. Each `scan(cfg, out)`
lists candidate images with their normalised labels -- no decoding yet -- and reports what it skipped;
`mysproj.stages.prep` checks every image and writes the outputs. Readers raise `BadInput` for problems that make
the dataset itself wrong (a missing split file, an empty class folder, a path escaping the root); single bad files
are skipped and reported instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import posixpath
import re
from dataclasses import dataclass, field

from mysproj.config.datasets import RECORDS
from mysproj.errors import BadInput
from mysproj.storage import exists, is_local, join, list_dirs, local_path
from mysproj.storage.digest import refuse_undecodable_name


@dataclass
class Candidate:
    split: str       # "train" or "test"
    image: str       # URI of the image object
    label: str       # normalised label
    relpath: str     # path below the dataset root, for the report


@dataclass
class Listing:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)       # {"split", "image", "reason"}
    # Classes the layout declares (label -> where it was declared); each must end up with a usable image.
    declared: dict[str, str] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)               # layout-specific facts for prep_report.json

    def skip(self, split: str, image: str, reason: str) -> None:
        self.skipped.append({"split": split, "image": image, "reason": reason})


def scan(cfg, out) -> Listing:
    if cfg.source:
        # Sample URIs must work from any working directory (and on another pod): make local roots absolute.
        cfg = dataclasses.replace(cfg, source=absolute_uri(cfg.source))
    listing = importlib.import_module(RECORDS[cfg.dataset].reader).scan(cfg, out)
    if cfg.source:
        refuse_links_out_of(cfg.source, listing.candidates)
    refuse_undecodable_names(listing.candidates)
    return listing


def refuse_undecodable_names(candidates: list[Candidate]) -> None:
    """`BadInput` for the first image whose path or class is not valid UTF-8 (Python carries such bytes as lone
    surrogates, which no manifest, JSON or Parquet file can hold)."""
    for c in candidates:
        refuse_undecodable_name(c.image)
        refuse_undecodable_name(c.label)


def refuse_links_out_of(root: str, candidates: list[Candidate]) -> None:
    """`BadInput` for the first image whose real path (symbolic links resolved) lies outside the dataset root.
    Object stores have no links; other remote file systems are read as they present their files."""
    if not is_local(root):
        return
    real_root = os.path.realpath(local_path(root))
    for c in candidates:
        real = os.path.realpath(local_path(c.image))
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise BadInput(f"{c.image}: a symbolic link to {real}, outside the dataset root {root}; datasets must "
                           f"hold their own files (copy the file in, or remove the link)")


def absolute_uri(uri: str) -> str:
    return os.path.abspath(os.path.expanduser(uri)) if "://" not in str(uri) else str(uri)


_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def safe_relpath(rel: str, where: str) -> str:
    """`rel` normalised, or `BadInput` if it is absolute or climbs out of the dataset root."""
    norm = posixpath.normpath(rel.strip().replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or _DRIVE.match(norm) or norm == ".":
        raise BadInput(f"{where}: path {rel.strip()!r} escapes the dataset root; split files must hold paths "
                       f"relative to the dataset root")
    return norm


def descend(source: str, marker: str) -> str:
    """`source`, or the one folder below it that holds `marker`: an archive unpacked as published keeps its top
    folder (`dtd/`, `PlantDoc-Dataset-<commit>/`, `CrisisMMD_v2.0/`)."""
    if exists(join(source, marker)):
        return source
    below = [join(source, d) for d in list_dirs(source) if not d.startswith((".", "_"))]
    found = [d for d in below if exists(join(d, marker))]
    return found[0] if len(found) == 1 else source
