"""report.md's Time section: where the run's time went. One row per stage output below the run roots (wall
seconds, GPU-seconds, throughput, from the `time` entry `run_stage` writes into every manifest), then the totals
and the elapsed time from the first stage's start to the last one's end (stages run side by side overlap)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mysproj.config.registry import summary_of
from mysproj.storage.digest import recorded


@dataclass
class StageTime:
    name: str
    stage: str
    wall_s: float
    gpu_s: float | None
    throughput: float | None
    unit: str | None
    started: str | None
    finished: str | None


def stage_times(roots: list[str]) -> list[StageTime]:
    """Every stage output `run_stage` wrote below `roots` (outputs without a `time` entry, from older versions,
    with their wall seconds only); the report's own output is not finished yet and left out."""
    rows = []
    for root in roots:
        for folder, m in recorded(root):
            t = summary_of(m).timing
            if not t or m.get("stage") == "report":
                continue
            name = folder if len(roots) == 1 else f"{root.rstrip('/')}/{folder}".rstrip("/")
            rows.append(StageTime(name or root, m.get("stage", "?"), float(t["wall_s"]), t.get("gpu_s"),
                                  t.get("throughput"), t.get("unit"), m.get("started"), m.get("finished")))
    return rows


def _elapsed(rows: list[StageTime]) -> float | None:
    try:
        starts = [datetime.fromisoformat(r.started) for r in rows if r.started]
        ends = [datetime.fromisoformat(r.finished) for r in rows if r.finished]
    except ValueError:
        return None
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def time_section(roots: list[str]) -> list[str]:
    rows = stage_times(roots)
    if not rows:
        return []
    lines = ["## Time", "",
             "Each stage's wall time, the GPU-seconds it held (wall time x GPUs; 0 on the CPU) and its throughput "
             "(the stage's own rate where it measures one, else its items over its wall time).", "",
             "| stage output | stage | wall s | GPU-s | throughput |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        gpu = "—" if r.gpu_s is None else f"{r.gpu_s:.1f}"
        rate = f"{r.throughput:.2f} {r.unit}" if r.throughput is not None else "—"
        lines.append(f"| `{r.name}` | {r.stage} | {r.wall_s:.1f} | {gpu} | {rate} |")
    wall = sum(r.wall_s for r in rows)
    gpu = sum(r.gpu_s or 0.0 for r in rows)
    elapsed = _elapsed(rows)
    lines += ["", f"Total: {len(rows)} stages, {wall:.1f} s of stage wall time ({wall / 60:.1f} min), "
                  f"{gpu:.1f} GPU-seconds"
              + (f"; {elapsed:.0f} s from the first start to the last end" if elapsed is not None else "") + ".", ""]
    return lines
