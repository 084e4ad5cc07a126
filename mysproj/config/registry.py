"""One registry entry per stage: its config class, the module that implements it, and the facts the pipeline,
the report and the model loader need about it. The CLI's stage commands, the DAG, the run layout, the report, the
model loader, the Job entry and the chart's values schema all read these records, so a stage is added here (plus
its config class and its module; docs/extending.md). No ML imports: the controller reads this too; an
implementation module is imported only when the stage runs (`mysproj.stages.registry.implementation`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mysproj.config import stages as C
from mysproj.config import summaries as S


@dataclass(frozen=True)
class StageRecord:
    name: str
    config: type                          # the stage's config dataclass (mysproj.config.stages)
    module: str                           # implementation: `<module>.run(cfg) -> manifest`
    summary: type[S.Summary] = S.Summary  # what its manifest's summary holds
    gpu: bool | Callable[[dict], bool] = False  # needs a device slot (or: given its node's config fields)
    compiles: bool = False                # torch.compile: shares `<root>/compile-cache`
    model: bool = False                   # its output is a model later stages load
    reported: bool = False                # the report reads its metrics.json (Tables 1-3)
    tracked: bool = False                 # writes TensorBoard event files (and W&B where set)
    mlflow: bool = False                  # logs to MLflow where the pipeline's tracking.mlflow_uri is set
    model_from: str | None = None         # config field naming the model its output derives from (lineage)
    tuned_from: str | None = None         # config field naming the fine-tune whose weights it carries (lineage)

    def needs_gpu(self, config: dict) -> bool:
        return self.gpu(config) if callable(self.gpu) else bool(self.gpu)


STAGES: dict[str, StageRecord] = {r.name: r for r in (
    StageRecord("fetch", C.FetchConfig, "mysproj.stages.fetch", S.FetchSummary, model=True),
    StageRecord("prep", C.PrepConfig, "mysproj.stages.prep", S.PrepSummary),
    StageRecord("model-init", C.ModelInitConfig, "mysproj.stages.model_init", S.ModelInitSummary,
                gpu=lambda config: config.get("preset") == "llava-1.5-7b", model=True),
    StageRecord("finetune", C.FinetuneConfig, "mysproj.stages.finetune", S.FinetuneSummary, gpu=True,
                compiles=True, model=True, tracked=True, mlflow=True, model_from="model"),
    StageRecord("merge", C.MergeConfig, "mysproj.stages.merge", S.MergeSummary, gpu=True, model=True,
                model_from="base", tuned_from="projector"),
    StageRecord("eval-clip", C.EvalClipConfig, "mysproj.stages.eval_clip", S.EvalSummary, gpu=True,
                compiles=True, reported=True, tracked=True, mlflow=True),
    StageRecord("eval-llava", C.EvalLlavaConfig, "mysproj.stages.eval_llava", S.EvalLlavaSummary, gpu=True,
                compiles=True, reported=True, tracked=True, mlflow=True),
    StageRecord("probe", C.ProbeConfig, "mysproj.stages.probe", S.ProbeSummary, gpu=True, reported=True,
                tracked=True, mlflow=True),
    StageRecord("report", C.ReportConfig, "mysproj.stages.report", S.ReportSummary, mlflow=True),
)}


def register(record: StageRecord) -> None:
    """Add a stage (an extension, or a test's toy stage); `unregister` takes it out again."""
    if record.name in STAGES:
        raise ValueError(f"stage {record.name!r} is registered already")
    STAGES[record.name] = record


def unregister(name: str) -> None:
    STAGES.pop(name, None)


def stages_where(flag: str) -> tuple[str, ...]:
    """Names of the stages whose record sets `flag` (compiles, model, reported, tracked, mlflow)."""
    return tuple(name for name, r in STAGES.items() if getattr(r, flag))


def summary_of(manifest: dict | None) -> S.Summary:
    """The typed summary of a stage output's manifest (the base `Summary` for an unknown stage or none)."""
    manifest = manifest or {}
    record = STAGES.get(manifest.get("stage") or "")
    return (record.summary if record else S.Summary).of(manifest.get("summary"))
