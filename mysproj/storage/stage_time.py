"""The `time` entry of every stage manifest's summary: where a run's time went, in the same keys everywhere.

    "time": {"wall_s": 129.4, "gpu_s": 129.4, "throughput": 17.1, "unit": "images/s"}

`run_stage` writes it for every stage, so in-process runs, the local runner's child processes and the Kubernetes
Jobs record it alike. A stage states what it processed with `processed(...)` under the summary key `processed`
(its own measured rate where it has one, e.g. the evaluation loop's images/s; else the count over the stage's wall
time). No ML imports: whether the stage computed on a GPU is read from an already imported torch, if any.
"""

from __future__ import annotations

import os
import sys

UNITS = ("images", "samples", "MB")


def processed(count: int, unit: str, per_s: float | None = None) -> dict:
    """The summary's `processed` entry: `count` items of `unit`, and the stage's own rate when it measured one."""
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r}: expected one of {', '.join(UNITS)}")
    entry: dict = {"count": int(count), "unit": unit}
    if per_s:
        entry["per_s"] = float(per_s)
    return entry


def _cuda_allocations() -> int:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


class GpuUse:
    """GPUs held by the code run between construction and `held()`: one per process of a distributed run
    (WORLD_SIZE) where this process allocated CUDA memory meanwhile, else 0. Counting allocations, not reading
    whether CUDA is initialised, keeps a CPU stage at 0 after a GPU stage ran in the same process."""

    def __init__(self):
        self._before = _cuda_allocations()

    def held(self) -> int:
        if _cuda_allocations() <= self._before:
            return 0
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))


def time_entry(summary: dict, wall_s: float, gpus: int) -> dict:
    work = summary.get("processed") or {}
    count, unit = work.get("count"), work.get("unit")
    rate = work.get("per_s") or (count / wall_s if count and wall_s > 0 else None)
    return {"wall_s": round(wall_s, 3), "gpu_s": round(wall_s * gpus, 3),
            "throughput": round(rate, 3) if rate else None, "unit": f"{unit}/s" if rate else None}


def summary_time(summary: dict) -> dict:
    """A manifest summary's `time` entry; an older manifest has only its wall seconds (`seconds`); {} without
    either."""
    entry = summary.get("time") if isinstance(summary.get("time"), dict) else {}
    if "wall_s" not in entry and "seconds" in summary:
        entry = {**entry, "wall_s": summary["seconds"]}
    return entry


def recorded(root: str) -> list[tuple[str, dict]]:
    """(folder relative to `root`, manifest) of every complete stage output below `root`, in path order."""
    from mysproj.storage import join, list_files
    from mysproj.storage.digest import MANIFEST, read_manifest

    found = []
    for rel in list_files(root):
        if rel == MANIFEST or rel.endswith("/" + MANIFEST):
            folder = rel[: -len(MANIFEST)].rstrip("/")
            manifest = read_manifest(join(root, folder) if folder else root)
            if manifest is not None:
                found.append((folder, manifest))
    return found
