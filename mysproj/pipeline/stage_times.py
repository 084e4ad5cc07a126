"""Recorded stage times, and each stage's predicted duration from them (the planner's clock, and the runner's
priority when it is given times).

Sources, `--stage-times SOURCE` (repeatable; a later source's record of the same kind wins):
- a run root (a path or any URI): the `time` entries in the manifests below it (`mysproj.storage.stage_time`);
- a JSON file as `mysproj bench pipeline` writes it:
      {"stages": {"<kind>[@<dataset>]": {"wall_s": s, "count": n, "throughput": r, "gpus": g,
                                         "gpu_memory_gib": m}, ...},
       "datasets": {"<dataset>": {"train": n, "test": n}, ...}}

A stage's kind is its stage name, plus the strategy (finetune), the preset (model-init) or the mode (eval-llava).
Prediction: the record of the same kind on the same dataset, else on any dataset (the largest measured). With an
item count and a throughput, the record's fixed part (wall time minus count / throughput: loading, compiling,
writing) plus this stage's items / throughput, the throughput scaled linearly where fine-tuning runs on more
devices than the record did; without, the record's wall time. A record's `gpu_memory_gib` (the largest peak of
its kind) is what the runner's device sharing (`--share-gpu`) counts a stage as holding: records of the same card.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from mysproj import layout
from mysproj.config.registry import summary_of
from mysproj.config.summaries import PrepSummary
from mysproj.data.shapes import SHAPES
from mysproj.errors import BadInput
from mysproj.pipeline.dag import Node
from mysproj.storage import read_text
from mysproj.storage.digest import recorded


@dataclass
class Record:
    wall_s: float
    count: float | None = None
    throughput: float | None = None
    gpus: float = 0.0
    gpu_memory_gib: float | None = None

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "count": self.count, "throughput": self.throughput,
                "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib}


@dataclass
class StageTimes:
    records: dict[str, Record] = field(default_factory=dict)    # "kind@dataset" or "kind" -> record
    datasets: dict[str, dict] = field(default_factory=dict)     # dataset -> {"train": n, "test": n}

    def update(self, other: StageTimes) -> None:
        self.records.update(other.records)
        self.datasets.update(other.datasets)

    def as_json(self) -> dict:
        return {"stages": {k: r.as_dict() for k, r in sorted(self.records.items())}, "datasets": self.datasets}


def kind(stage: str, config: dict) -> str:
    variant = {"finetune": "strategy", "model-init": "preset", "eval-llava": "mode"}.get(stage)
    defaults = {"strategy": "projector", "preset": "tiny", "mode": "generate"}
    return f"{stage}:{config.get(variant, defaults[variant])}" if variant else stage


def dataset_of(folder: str) -> str | None:
    """The dataset of a stage output folder relative to the run root (None for models and the report)."""
    parsed = layout.parse(folder)
    if parsed:
        return parsed["dataset"]
    parts = folder.strip("/").split("/")
    return parts[0] if len(parts) == 2 and parts[1] == "prep" else None


def items(node: Node, sizes: dict[str, dict]) -> float | None:
    """Images or samples `node` processes, from its dataset's split sizes (None where unknown or not counted)."""
    size = sizes.get(dataset_of(node.name) or "")
    if not size:
        return None
    train, test = size.get("train", 0), size.get("test", 0)
    split = node.config.get("split", "test")
    per_stage = {"prep": train + test, "probe": train + test,
                 "eval-clip": size.get(split, 0), "eval-llava": size.get(split, 0),
                 "finetune": train * float(node.config.get("epochs", 1.0))}
    n = per_stage.get(node.stage)
    if node.stage == "eval-llava" and n and node.config.get("limit"):
        n = min(n, int(node.config["limit"]))
    return n


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(outputs: list[tuple[str, dict, float | None]]) -> StageTimes:
    """Records from `(folder relative to the run root, manifest, observed wall seconds or None)`: the mean per kind
    and dataset. An observed wall time (the runner's, process start-up included) replaces the manifest's."""
    groups: dict[str, list[Record]] = {}
    times = StageTimes()
    for folder, m, observed in outputs:
        summary = summary_of(m)
        ds = dataset_of(folder)
        if isinstance(summary, PrepSummary) and ds:
            times.datasets[ds] = {"train": summary.train, "test": summary.test}
        t = summary.time
        if not t:
            continue
        rec = Record(observed if observed is not None else t["wall_s"], (summary.processed or {}).get("count"),
                     t.get("throughput"), t["gpu_s"] / t["wall_s"] if t["wall_s"] else 0.0, t.get("gpu_memory_gib"))
        k = kind(m.get("stage", ""), m.get("config") or {})
        groups.setdefault(f"{k}@{ds}" if ds else k, []).append(rec)
    for key, recs in groups.items():
        peaks = [r.gpu_memory_gib for r in recs if r.gpu_memory_gib is not None]
        times.records[key] = Record(statistics.fmean(r.wall_s for r in recs), _mean([r.count for r in recs]),
                                    _mean([r.throughput for r in recs]), statistics.fmean(r.gpus for r in recs),
                                    max(peaks, default=None))
    return times


def from_root(root: str) -> StageTimes:
    return summarise([(folder, m, None) for folder, m in recorded(root)])


def from_json(uri: str) -> StageTimes:
    try:
        doc = json.loads(read_text(uri))
        records = {k: Record(float(v["wall_s"]), v.get("count"), v.get("throughput"), float(v.get("gpus") or 0),
                             None if v.get("gpu_memory_gib") is None else float(v["gpu_memory_gib"]))
                   for k, v in doc.get("stages", {}).items()}
        return StageTimes(records, dict(doc.get("datasets", {})))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadInput(f"stage times {uri}: expected JSON {{\"stages\": {{kind: {{\"wall_s\": ...}}}}}} "
                       f"({type(e).__name__}: {e})") from None


def load(sources: list[str]) -> StageTimes:
    times = StageTimes()
    for src in sources:
        times.update(from_json(src) if src.endswith(".json") else from_root(src))
    return times


def dataset_sizes(times: StageTimes, datasets: list[str]) -> dict[str, dict]:
    """Split sizes per dataset: the recorded ones, else the real sizes of the four paper datasets."""
    sizes = {}
    for d in datasets:
        if d in times.datasets:
            sizes[d] = times.datasets[d]
        elif d in SHAPES:
            shape = SHAPES[d]
            sizes[d] = {"train": shape.train_images(), "test": shape.test_images()}
    return sizes


def record_for(node: Node, times: StageTimes) -> Record | None:
    k = kind(node.stage, node.config)
    ds = dataset_of(node.name)
    if ds and f"{k}@{ds}" in times.records:
        return times.records[f"{k}@{ds}"]
    if k in times.records:
        return times.records[k]
    candidates = [r for key, r in times.records.items() if key.split("@")[0] == k]
    return max(candidates, key=lambda r: (r.count or 0, r.wall_s), default=None)


def memory(node: Node, times: StageTimes) -> float | None:
    """GiB of device memory `node` is counted as holding: its kind's recorded peak; 0 where its record held no
    GPU (a stage that may run on one but did not); None without a record."""
    rec = record_for(node, times)
    if rec is None or not node.gpu:
        return None
    return rec.gpu_memory_gib if rec.gpus else 0.0


def predict(node: Node, times: StageTimes, sizes: dict[str, dict], devices: int = 1) -> float | None:
    """Predicted seconds for `node` on `devices` device slots, or None without a record of its kind."""
    rec = record_for(node, times)
    if rec is None:
        return None
    n = items(node, sizes)
    if not (n and rec.count and rec.throughput):
        return rec.wall_s
    rate = rec.throughput
    if node.stage == "finetune" and rec.gpus >= 1 and devices != rec.gpus:
        rate *= devices / rec.gpus
    fixed = max(0.0, rec.wall_s - rec.count / rec.throughput)
    return fixed + n / rate
