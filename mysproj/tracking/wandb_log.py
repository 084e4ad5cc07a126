"""Weights & Biases, opt-in (`tracking.wandb_project`): one W&B run per stage output attempt, named by its run
path and grouped by run root, with the stage's config and the same metrics as TensorBoard (per optimizer step for
fine-tuning). The API key comes from the environment only (WANDB_API_KEY; the chart's trackingSecret), and
WANDB_MODE=offline writes the runs locally for `wandb sync` later. Like MLflow, W&B is a view: a failure is one
warning line and the stage goes on, its manifest recording what was missed (`summary.wandb`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from mysproj.config.fields import config_hash, config_to_dict
from mysproj.errors import redact
from mysproj.tracking.mlflow_log import root_and_path

log = logging.getLogger(__name__)


class WandbRun:
    def __init__(self, cfg, stage: str):
        self.run = None
        self.error: str | None = None
        self.missed = 0
        root, rel = root_and_path(cfg.out)
        # A new run per attempt: W&B drops points at steps it has seen, so a resumed fine-tuning logs its
        # checkpoint's points again in a run of its own rather than losing the steps after the checkpoint.
        self._call("init", lambda: self._init(cfg.wandb_project, rel, root, stage, config_to_dict(cfg),
                                               config_hash(cfg)))

    def _init(self, project, rel, root, stage, config, digest):
        import wandb  # noqa: PLC0415 - optional: only where tracking.wandb_project is set (not in the CPU image)

        self.run = wandb.init(project=project, name=rel, group=root, job_type=stage, config=config,
                              tags=[stage, f"config-{digest}"], reinit="create_new",
                              id=f"{digest}-{time.time_ns() // 1000}")

    def _call(self, what, fn) -> None:
        if self.error is not None:
            self.missed += 1
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - W&B is a view of the run; the stage goes on without it
            self.error = redact(f"{what}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            self.missed += 1
            log.warning("wandb: %s; the stage goes on without W&B, its manifest says what was missed", self.error)

    def metrics(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        if self.run is not None:
            self._call("log", lambda: self.run.log({k: v for k, v in values.items() if v is not None},
                                                   step=int(step)))

    def flush(self) -> None:
        """W&B sends in the background; nothing to do per batch."""

    def end(self) -> dict:
        if self.run is not None:
            self._call("finish", self.run.finish)
        return {"run_id": getattr(self.run, "id", None), "missed": self.missed, "error": self.error}


def stage_run(cfg, stage: str) -> WandbRun | None:
    return WandbRun(cfg, stage) if getattr(cfg, "wandb_project", None) else None
