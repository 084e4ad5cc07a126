"""The summary each stage writes into its manifest (`_SUCCESS.json`'s "summary"), typed. Stages still write a
plain mapping; readers get one of these from `mysproj.config.registry.summary_of(manifest)` instead of reading
keys by string, so a renamed field fails in one place. Every field has a default: manifests written by older
versions lack some. `raw` keeps the whole mapping for what only a display needs. No ML imports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Summary:
    """What `run_stage` adds to every stage's summary."""

    seconds: float | None = None            # the stage's wall seconds
    time: dict = field(default_factory=dict)  # wall_s, gpu_s, throughput, unit (mysproj.storage.stage_time)
    processed: dict | None = None           # {"count", "unit", "per_s"}: the work done, for throughput
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, summary: dict | None) -> Summary:
        summary = summary if isinstance(summary, dict) else {}
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in summary.items() if k in known}, raw=summary)

    @property
    def timing(self) -> dict:
        """The `time` entry; an older manifest has only its wall seconds (`seconds`); {} without either."""
        entry = self.time if isinstance(self.time, dict) else {}
        if "wall_s" not in entry and self.seconds is not None:
            entry = {**entry, "wall_s": self.seconds}
        return entry

    def get(self, key: str, default: Any = None) -> Any:
        """A field no summary type names (a display's extra): read from the mapping as written."""
        return self.raw.get(key, default)


@dataclass(frozen=True)
class ModelSummary(Summary):
    """A stage whose output is a model later stages load."""

    layout: str | None = None               # "hf" (a loadable HF-layout folder), "projector" (projector only)
    random_weights: bool = False            # weights drawn at random (model-init) or descended from such


@dataclass(frozen=True)
class FetchSummary(ModelSummary):
    content: str | None = None              # dataset, llava, clip, files
    bytes_total: int = 0
    bytes_fetched: int = 0


@dataclass(frozen=True)
class PrepSummary(Summary):
    classes: int = 0
    train: int = 0
    test: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class ModelInitSummary(ModelSummary):
    random_weights: bool = True
    preset: str | None = None


@dataclass(frozen=True)
class FinetuneSummary(ModelSummary):
    strategy: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class MergeSummary(ModelSummary):
    base: str | None = None
    projector: str | None = None
    reused: dict | None = None              # {"files", "bytes", "by"} where the base's files were reused


@dataclass(frozen=True)
class EvalSummary(Summary):
    accuracy: float | None = None
    macro_f1: float | None = None
    n: int | None = None


@dataclass(frozen=True)
class EvalLlavaSummary(EvalSummary):
    unparsed: int | None = None


@dataclass(frozen=True)
class ProbeSummary(Summary):
    pre_macro_f1: float | None = None
    post_macro_f1: float | None = None
    pre_accuracy: float | None = None
    post_accuracy: float | None = None


@dataclass(frozen=True)
class ReportSummary(Summary):
    runs: int = 0
    table1_rows: str | None = None          # Table 1's rows as report.md prints them
    random_weights: bool = False            # some reported run descends from random weights
