"""`mysproj prep`: a dataset on disk or in an object store -> the prepared inputs every later stage reads.

    mysproj prep --dataset dtd --source s3://data/dtd --out s3://runs/r1/dtd/prep

Outputs (manifest last): samples.parquet, train.csv / test.csv (the released code's `imagefilename,label`),
llava_train.json / llava_test.json (the released code's conversation format with the paper's prompt), classes.json and
prep_report.json (counts per split and class; every skipped file and why).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mysproj.config.datasets import RECORDS
from mysproj.config.stages import PrepConfig
from mysproj.data.datasets import Candidate, Listing, scan
from mysproj.data.image_checks import check_images
from mysproj.data.labels import ordered_classes
from mysproj.data.prompts import llava_records, split_rng
from mysproj.errors import BadInput
from mysproj.evaluation.answers import normalise
from mysproj.storage.manifest import StageOutput, run_stage
from mysproj.storage.stage_time import processed

log = logging.getLogger(__name__)
SPLITS = ("train", "test")


@dataclass
class PreparedSample:
    split: str
    image: str
    label: str
    label_id: int
    sha256: str
    width: int
    height: int
    relpath: str


def run(cfg: PrepConfig) -> dict:
    return run_stage("prep", cfg, lambda out: prepare(cfg, out))


def _cap(candidates: list[Candidate], cfg: PrepConfig) -> list[Candidate]:
    """At most `max_per_class` per class and split, a seeded sample (decided before any image is read)."""
    if not cfg.max_per_class:
        return candidates
    groups: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[(c.split, c.label)].append(c)
    rng = random.Random(f"mysproj-cap:{cfg.seed}")
    kept = []
    for key in sorted(groups):
        group = groups[key]
        kept.extend(group if len(group) <= cfg.max_per_class else rng.sample(group, cfg.max_per_class))
    return kept


def _check(listing: Listing, cfg: PrepConfig) -> list[PreparedSample]:
    candidates = _cap(listing.candidates, cfg)
    checks = check_images([c.image for c in candidates], cfg.workers, what=f"prep {cfg.dataset}: checking images",
                          max_pixels=cfg.max_image_pixels)
    good = []
    for c, chk in zip(candidates, checks):
        if chk.ok:
            good.append((c, chk))
        else:
            listing.skip(c.split, c.image, chk.error)
    classes = ordered_classes(c.label for c, _ in good)
    for label, where in sorted(listing.declared.items()):
        if label not in classes:
            raise BadInput(f"class '{label}' ({where}) has no usable images: every file was missing or "
                           f"unreadable (see the skipped files); add images or remove the class")
    if len(classes) < 2:
        raise BadInput(f"dataset {cfg.dataset} at {cfg.source} has {len(classes)} class(es) with usable images "
                       f"({', '.join(classes) or 'none'}); classification needs at least two")
    _check_distinguishable(classes, cfg)
    label_id = {c: i for i, c in enumerate(classes)}
    samples = [PreparedSample(c.split, c.image, c.label, label_id[c.label], chk.sha256, chk.width, chk.height,
                              c.relpath) for c, chk in good]
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.image))
    for split in SPLITS:
        if not any(s.split == split for s in samples):
            raise BadInput(f"dataset {cfg.dataset} at {cfg.source}: the {split} split has no usable images")
    return samples


def _check_distinguishable(classes: list[str], cfg: PrepConfig) -> None:
    """Evaluation matches answers to class names after `normalise` (lower case, a-z and 0-9 only): a name that is
    empty there (non-Latin letters only) or two names that become the same text could never be told apart."""

    seen: dict[str, str] = {}
    for c in classes:
        key = normalise(c)
        if not key:
            raise BadInput(f"dataset {cfg.dataset}: class name {c!r} has no letters a-z or digits, so evaluation "
                           f"cannot match an answer to it; rename the class folder/label")
        if key in seen:
            raise BadInput(f"dataset {cfg.dataset}: class names {seen[key]!r} and {c!r} are the same text "
                           f"({key!r}) to evaluation, which could not tell them apart; rename one")
        seen[key] = c


def _parquet(samples: list[PreparedSample]) -> bytes:
    cols = ("split", "image", "label", "label_id", "sha256", "width", "height", "relpath")
    table = pa.table({c: [getattr(s, c) for s in samples] for c in cols})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _csv(samples: list[PreparedSample]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["imagefilename", "label"])
    w.writerows([s.image, s.label] for s in samples)
    return buf.getvalue()


def _report(cfg: PrepConfig, listing: Listing, samples: list[PreparedSample], classes: list[str]) -> dict:
    counts = {}
    for split in SPLITS:
        per_class = Counter(s.label for s in samples if s.split == split)
        counts[split] = {"total": sum(per_class.values()), "per_class": {c: per_class.get(c, 0) for c in classes}}
    missing = {split: [c for c in classes if counts[split]["per_class"][c] == 0] for split in SPLITS}
    by_sha: dict[str, set] = defaultdict(set)
    for s in samples:
        by_sha[s.sha256].add(s.split)
    reasons = Counter(entry["reason"].split(" (")[0] for entry in listing.skipped)
    return {
        "dataset": cfg.dataset, "source": cfg.source, "n_classes": len(classes), "counts": counts,
        # e.g. PlantDoc's train-only class: kept in train, listed here.
        "classes_missing_in_split": {k: v for k, v in missing.items() if v},
        "identical_images_in_both_splits": sum(1 for splits in by_sha.values() if len(splits) > 1),
        "skipped_count": len(listing.skipped), "skipped_by_reason": dict(sorted(reasons.items())),
        "skipped": listing.skipped, "notes": listing.notes,
    }


def prepare(cfg: PrepConfig, out: StageOutput) -> dict:
    listing = scan(cfg, out)
    samples = _check(listing, cfg)
    classes = ordered_classes(s.label for s in samples)
    task = cfg.task or RECORDS[cfg.dataset].task
    report = _report(cfg, listing, samples, classes)
    for split, missing in report["classes_missing_in_split"].items():
        log.warning("prep: no %s images for class(es) %s (kept in the other split)", split, ", ".join(missing))
    if listing.skipped:
        log.warning("prep: skipped %d file(s): %s (details in prep_report.json)", len(listing.skipped),
                    ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items()))

    out.write_bytes("samples.parquet", _parquet(samples))
    for split in SPLITS:
        part = [s for s in samples if s.split == split]
        out.write_text(f"{split}.csv", _csv(part))
        records = llava_records(part, classes, task, split_rng(cfg.seed, split), cfg.prompt_style)
        out.write_text(f"llava_{split}.json", json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    out.write_json("classes.json", {"classes": classes, "task": task, "dataset": cfg.dataset,
                                    "label_underscores": cfg.label_underscores, "prompt_style": cfg.prompt_style})
    out.write_json("prep_report.json", report)
    summary = {"classes": len(classes), "train": report["counts"]["train"]["total"],
               "test": report["counts"]["test"]["total"], "skipped": len(listing.skipped),
               "processed": processed(len(samples), "images")}
    log.info("prep %s: %d classes, %d train / %d test images, %d skipped", cfg.dataset, summary["classes"],
             summary["train"], summary["test"], summary["skipped"])
    return summary
