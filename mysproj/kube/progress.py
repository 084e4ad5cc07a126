"""What a stage is doing, in a few words for the status table: the latest line of its `metrics.jsonl` (step, loss,
rate, ETA), a finished stage's own wall time and throughput from its manifest, and times as the table prints them."""

from __future__ import annotations

import json
from datetime import datetime

from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.storage import join, read_text


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def duration(start: str | None, end: str | None, now: datetime) -> str:
    t0 = parse_time(start)
    if t0 is None:
        return ""
    return seconds(((parse_time(end) or now) - t0).total_seconds())


def seconds(secs: float) -> str:
    h, rem = divmod(max(int(secs), 0), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def progress(out: str) -> str:
    """`step 40/200 loss 1.234 eta 5m` from the last line of `<out>/metrics.jsonl`, if the stage writes one."""
    try:
        lines = [ln for ln in read_text(join(out, "metrics.jsonl")).splitlines() if ln.strip()]
        last = json.loads(lines[-1])
    except (BadInput, FileNotFoundError, IndexError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    parts = []
    if "step" in last:
        parts.append(f"step {last['step']}" + (f"/{last['total']}" if last.get("total") else ""))
    if isinstance(last.get("loss"), (int, float)):
        parts.append(f"loss {last['loss']:.4g}")
    if isinstance(last.get("samples_per_s"), (int, float)):
        parts.append(f"{last['samples_per_s']:.3g} samples/s")
    if isinstance(last.get("eta_s"), (int, float)):
        parts.append(f"eta {seconds(last['eta_s'])}")
    return " ".join(parts)


def stage_time(manifest: dict | None) -> tuple[float | None, str]:
    """(wall seconds, "<throughput> <unit>") of a finished stage from its manifest's summary; older manifests have
    no `time` entry (only `seconds`), and a stage without a natural unit has no throughput."""
    timing = summary_of(manifest).timing
    wall = timing.get("wall_s")
    rate, unit = timing.get("throughput"), timing.get("unit")
    wall = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and unit:
        return wall, f"{rate:.3g} {unit}"
    return wall, ""
