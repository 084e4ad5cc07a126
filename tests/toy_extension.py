"""A toy dataset and a toy stage, each as a newcomer adds one (docs/extending.md): its record plus this module.
test_extending.py registers them, runs them through the CLI and the pipeline's checks, and takes them out again."""

from __future__ import annotations

from dataclasses import dataclass

from mysproj.config.datasets import Dataset
from mysproj.config.fields import opt
from mysproj.config.registry import StageRecord
from mysproj.config.summaries import Summary
from mysproj.data.datasets.imagefolder import scan_folders
from mysproj.storage.manifest import StageInput, run_stage


# The dataset: `<split>/<class>/<file>` with the splits named `fit` and `check`.
def scan(cfg, out):
    return scan_folders(cfg.source, {"train": "fit", "test": "check"}, cfg.label_underscores)


DATASET = Dataset("toy-shapes", __name__, "simple shapes", paper_task="Textures")


# The stage: counts the classes of a prep output.
@dataclass(kw_only=True)
class ClassCountConfig:
    """Count the classes of a prepared dataset (a toy stage)."""

    data: str = opt(help="prep output URI", input=True)
    out: str = opt(help="output folder URI")
    at_least: int = opt(1, help="classes expected at least", min=1)


@dataclass(frozen=True)
class ClassCountSummary(Summary):
    classes: int = 0
    task: str | None = None


def run(cfg: ClassCountConfig) -> dict:
    def body(out):
        classes = StageInput(cfg.data, expect_stage="prep").read_json("classes.json")
        out.write_json("counts.json", {"classes": len(classes["classes"])})
        return {"classes": len(classes["classes"]), "task": classes["task"]}

    return run_stage("class-count", cfg, body)


STAGE = StageRecord("class-count", ClassCountConfig, __name__, ClassCountSummary)
