"""The `time` entry of every stage manifest's summary: where a run's time went, in the same keys everywhere.

    "time": {"wall_s": 129.4, "gpu_s": 129.4, "throughput": 17.1, "unit": "images/s",
             "transfer_in_s": 3.1, "compute_s": 124.2, "transfer_out_s": 2.1, "gpu_memory_gib": 21.3}

`run_stage` writes it for every stage, so in-process runs, the local runner's child processes and the Kubernetes
Jobs record it alike. A stage states what it processed with `processed(...)` under the summary key `processed`
(its own measured rate where it has one, e.g. the evaluation loop's images/s; else the count over the stage's wall
time). `transfer_in_s` / `transfer_out_s` are the wall seconds during which the stage was reading from / writing to
remote storage (`transfer(...)` spans of the storage layer, overlapping ones counted once), `compute_s` the rest of
the wall time. `gpu_memory_gib` is the most device memory PyTorch's allocator held for the stage (reserved, rank 0's
where several processes ran it; None for a CPU stage): what a stage sharing the card must leave room for. No ML
imports: whether the stage computed on a GPU is read from an already imported torch, if any.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
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
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # The allocator keeps what an earlier stage of this process reserved: released first, the peak below is
            # what this stage holds, as it would in a process of its own (what --share-gpu plans with).
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if (left := torch.cuda.memory_allocated()) > 2**29:  # an earlier stage's tensors still referenced
                log.warning("%.1f GiB of GPU memory still allocated as this stage starts (an earlier stage of "
                            "the process holds it)", left / 2**30)

    def held(self) -> int:
        if _cuda_allocations() <= self._before:
            return 0
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))

    def peak_gib(self) -> float | None:
        """GiB of device memory the allocator held at most since construction; None where nothing was allocated."""
        if not self.held():
            return None
        return round(sys.modules["torch"].cuda.max_memory_reserved() / 2**30, 2)


_SPANS = threading.Lock()
_ACTIVE = {"in": 0, "out": 0}
_SINCE = {"in": 0.0, "out": 0.0}
_TOTAL = {"in": 0.0, "out": 0.0}


@contextmanager
def transfer(direction: str) -> Iterator[None]:
    """Count the time inside as input ("in") or output ("out") transfer; concurrent spans (threads) count once."""
    with _SPANS:
        if not _ACTIVE[direction]:
            _SINCE[direction] = time.monotonic()
        _ACTIVE[direction] += 1
    try:
        yield
    finally:
        with _SPANS:
            _ACTIVE[direction] -= 1
            if not _ACTIVE[direction]:
                _TOTAL[direction] += time.monotonic() - _SINCE[direction]


def transfer_seconds() -> dict[str, float]:
    """Seconds of input and output transfer in this process so far (spans still open included)."""
    now = time.monotonic()
    with _SPANS:
        return {d: _TOTAL[d] + (now - _SINCE[d] if _ACTIVE[d] else 0.0) for d in _TOTAL}


def time_entry(summary: dict, wall_s: float, gpus: int, transfers: dict[str, float] | None = None,
               gpu_memory_gib: float | None = None) -> dict:
    """`transfers`: {"in": s, "out": s} of the stage's own run (`transfer_seconds()` after minus before)."""
    work = summary.get("processed") or {}
    count, unit = work.get("count"), work.get("unit")
    rate = work.get("per_s") or (count / wall_s if count and wall_s > 0 else None)
    t_in, t_out = (min(wall_s, (transfers or {}).get(d, 0.0)) for d in ("in", "out"))
    # GPU-seconds from the rounded wall time, so that gpu_s is exactly GPUs x wall_s as recorded
    return {"wall_s": round(wall_s, 3), "gpu_s": round(round(wall_s, 3) * gpus, 3),
            "throughput": round(rate, 3) if rate else None, "unit": f"{unit}/s" if rate else None,
            "transfer_in_s": round(t_in, 3), "compute_s": round(max(0.0, wall_s - t_in - t_out), 3),
            "transfer_out_s": round(t_out, 3), "gpu_memory_gib": gpu_memory_gib}
