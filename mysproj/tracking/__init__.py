"""Where a run's numbers go besides its manifests: TensorBoard event files inside each stage output (on by
default), MLflow where a tracking server is named. A tracking library is imported only by a stage that logs to it."""

from __future__ import annotations

from collections.abc import Mapping


def stage_metrics(cfg, out, stage: str, values: Mapping[str, float | None]) -> dict:
    """An evaluation's or probe's numbers to TensorBoard and MLflow, as its config asks; returns what its
    manifest's summary keeps about it ({} or {"mlflow": ...})."""
    if getattr(cfg, "tensorboard", False):
        from mysproj.tracking.tensorboard import write_scalars

        write_scalars(out, values)
    if not getattr(cfg, "mlflow_uri", None):
        return {}
    from mysproj.tracking.mlflow_log import stage_run

    run = stage_run(cfg, stage)
    run.metrics(0, values)
    return {"mlflow": run.end()}
