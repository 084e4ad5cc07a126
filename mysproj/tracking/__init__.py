"""Where a run's numbers go besides its manifests: TensorBoard event files inside each stage output (on by
default), MLflow where a tracking server is named, Weights & Biases where a project is. A tracking library is
imported only by a stage that logs to it."""

from __future__ import annotations

from collections.abc import Mapping

from mysproj.tracking.mlflow_log import stage_run
from mysproj.tracking.tensorboard import write_scalars
from mysproj.tracking.wandb_log import stage_run as wandb_run


def stage_metrics(cfg, out, stage: str, values: Mapping[str, float | None]) -> dict:
    """An evaluation's or probe's numbers to TensorBoard and MLflow, as its config asks; returns what its
    manifest's summary keeps about it ({} or {"mlflow": ...})."""
    if getattr(cfg, "tensorboard", False):
        write_scalars(out, values)
    kept = {}
    for name, run in runs(cfg, stage).items():
        run.metrics(0, values)
        kept[name] = run.end()
    return kept


def runs(cfg, stage: str) -> dict:
    """{"mlflow": run, "wandb": run} of the services `cfg` names (each with metrics, flush, end), none imported
    otherwise."""
    found = {}
    if getattr(cfg, "mlflow_uri", None):
        found["mlflow"] = stage_run(cfg, stage)
    if getattr(cfg, "wandb_project", None):
        found["wandb"] = wandb_run(cfg, stage)
    return found
