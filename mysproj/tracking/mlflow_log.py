"""MLflow, where the run names a tracking server (`tracking.mlflow_uri`): one parent run per run root (created by
`mysproj run` or the Kubernetes controller, else by the first stage that logs), and under it one child run per
stage output with the stage's config as params, its metrics (per optimizer step for fine-tuning) and tags (run path,
config hash, code version, image); the report's files are artifacts of the parent.

A tracking server is a view of the run, never a dependency of it: the first call that fails (down, refusing,
timing out) is one warning line, MLflow is off for the rest of the stage, and the stage's manifest records what was
missed (`summary.mlflow`). No retries with backoff: a server that is down answers at once, so it costs no time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from mysproj import layout
from mysproj.config.fields import config_hash, config_to_dict
from mysproj.errors import redact
from mysproj.storage.manifest import code_version

log = logging.getLogger(__name__)
ROOT_TAG, KIND_TAG, OUTPUT_TAG = "mysproj.root", "mysproj.kind", "mysproj.output"
MAX_PARAM = 6000  # MLflow's limit on a param value


def root_and_path(out_uri: str) -> tuple[str, str]:
    """(run root, path below it) of a stage output in the run layout; (parent folder, name) otherwise."""
    parts = out_uri.rstrip("/").split("/")
    for n in (4, 3, 2):
        rel = "/".join(parts[-n:])
        if len(parts) > n and (layout.parse(rel) or (n == 2 and parts[-2] in ("models", "report"))):
            return "/".join(parts[:-n]), rel
    if parts[-1] == "report":
        return "/".join(parts[:-1]), "report"
    return "/".join(parts[:-1]), parts[-1]


def _code_tags() -> dict[str, str]:
    tags = {"mysproj.code_version": code_version()}
    for env, tag in (("MYSPROJ_GIT_SHA", "mlflow.source.git.commit"), ("MYSPROJ_IMAGE", "mysproj.image")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class Tracker:
    """An MLflow client that fails soft: `call` runs one request; after the first failure everything is skipped and
    counted in `missed`."""

    def __init__(self, uri: str, experiment: str = "mysproj", *, quiet: bool = False):
        # Fail fast: MLflow's default is several retries with backoff (minutes against a server that is gone).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 - only where tracking.mlflow_uri is set

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.error: str | None = None
        self.missed = 0
        self.quiet = quiet  # the caller says what a failure means for it
        self._experiment_id: str | None = None

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.error is not None:
            self.missed += 1
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - whatever the server or network does, the stage goes on
            first = (str(e).splitlines() or [""])[0][:200]
            self.error = redact(f"{what}: {type(e).__name__}: {first}")
            self.missed += 1
            if not self.quiet:
                log.warning("mlflow: %s did not answer (%s); the stage goes on without MLflow, its manifest says "
                            "what was missed", redact(self.uri), self.error)
            return None

    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            def find_or_create():
                found = self.client.get_experiment_by_name(self.experiment)
                return found.experiment_id if found else self.client.create_experiment(self.experiment)
            self._experiment_id = self.call("experiment", find_or_create)
        return self._experiment_id

    def _search(self, filters: str) -> list:
        eid = self.experiment_id()
        if eid is None:
            return []
        return self.call("search", lambda: self.client.search_runs([eid], filter_string=filters)) or []

    def parent(self, root: str, tags: Mapping[str, str] | None = None) -> str | None:
        """The parent run of run root `root` (created when there is none) with `tags` set on it (a stage that found
        none made it without them); its id, None when MLflow is off."""
        found = self._search(f"tags.`{ROOT_TAG}` = '{root}' and tags.`{KIND_TAG}` = 'parent'")
        if found:
            run = found[0]
            missing = {k: v for k, v in (tags or {}).items() if run.data.tags.get(k) != v}
            if missing:
                from mlflow.entities import RunTag  # noqa: PLC0415 - only where tracking.mlflow_uri is set

                self.call("tag parent run", lambda: self.client.log_batch(
                    run.info.run_id, tags=[RunTag(k, str(v)) for k, v in missing.items()]))
            return run.info.run_id
        eid = self.experiment_id()
        if eid is None:
            return None
        run = self.call("create parent run", lambda: self.client.create_run(
            eid, run_name=root.rstrip("/").split("/")[-1] or root,
            tags={ROOT_TAG: root, KIND_TAG: "parent", **_code_tags(), **(tags or {})}))
        return run.info.run_id if run else None

    def record(self, run_id: str | None) -> dict:
        """What the manifest keeps: the run, and what MLflow missed."""
        return {"uri": redact(self.uri), "run_id": run_id, "missed": self.missed, "error": self.error}


class StageRun:
    """One stage output's child run. A new attempt (a resumed fine-tuning, a re-run after a config or an input
    changed) replaces the runs of earlier attempts at the same output, which are deleted: the output holds only
    this attempt's result, and the points a checkpoint kept are logged again, none twice."""

    def __init__(self, tracker: Tracker, cfg, stage: str):
        self.tracker = tracker
        root, rel = root_and_path(cfg.out)
        self.run_id: str | None = None
        self._points: list = []
        parent = tracker.parent(root)
        if parent is None:
            return
        for old in tracker._search(f"tags.`{OUTPUT_TAG}` = '{cfg.out}'"):
            tracker.call("delete old attempt", lambda old=old: tracker.client.delete_run(old.info.run_id))
        tags = {"mlflow.parentRunId": parent, OUTPUT_TAG: cfg.out, "mysproj.run_path": rel, "mysproj.stage": stage,
                "mysproj.config_hash": config_hash(cfg), **_code_tags()}
        run = tracker.call("create run", lambda: tracker.client.create_run(tracker.experiment_id(), run_name=rel,
                                                                           tags=tags))
        if run is None:
            return
        self.run_id = run.info.run_id
        from mlflow.entities import Param  # noqa: PLC0415 - only where tracking.mlflow_uri is set

        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(config_to_dict(cfg).items())]
        for i in range(0, len(params), 100):
            tracker.call("params", lambda chunk=params[i:i + 100]: tracker.client.log_batch(self.run_id,
                                                                                           params=chunk))

    def metrics(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """Points kept until `flush` (one request per batch, not per step)."""
        if self.run_id is not None:
            ms = int((wall_time or time.time()) * 1000)
            self._points += [(k, float(v), ms, int(step)) for k, v in values.items() if v is not None]

    def flush(self) -> None:
        if self.run_id is None or not self._points:
            return
        from mlflow.entities import Metric  # noqa: PLC0415 - only where tracking.mlflow_uri is set

        points, self._points = self._points, []
        for i in range(0, len(points), 1000):
            chunk = [Metric(k, v, ms, s) for k, v, ms, s in points[i:i + 1000]]
            self.tracker.call("metrics", lambda chunk=chunk: self.tracker.client.log_batch(self.run_id,
                                                                                           metrics=chunk))

    def end(self) -> dict:
        """Flush, mark the run finished; returns the manifest's record."""
        self.flush()
        if self.run_id is not None:
            self.tracker.call("finish", lambda: self.tracker.client.set_terminated(self.run_id, "FINISHED"))
        return self.tracker.record(self.run_id)


def stage_run(cfg, stage: str) -> StageRun | None:
    """The child run of `cfg.out` where the config names a tracking server, else None (mlflow not imported)."""
    uri = getattr(cfg, "mlflow_uri", None)
    if not uri:
        return None
    return StageRun(Tracker(uri, getattr(cfg, "mlflow_experiment", None) or "mysproj"), cfg, stage)


def parent_run(uri: str | None, experiment: str, root: str, tags: Mapping[str, str] | None = None) -> str | None:
    """Create the parent run of a run root up front (`mysproj run`, the controller), so stages starting side by
    side find one parent rather than each making its own; or give the one a stage made its `tags`. The error where
    the server did not answer (nothing logged), else None."""
    if not uri:
        return None
    tracker = Tracker(uri, experiment, quiet=True)
    tracker.parent(root, tags)
    return tracker.error


def report_artifacts(cfg, folder: str) -> dict | None:
    """The report's files (everything under `folder`) as artifacts of the parent run of `cfg.runs[0]`."""
    uri = getattr(cfg, "mlflow_uri", None)
    if not uri or not cfg.runs:
        return None
    tracker = Tracker(uri, getattr(cfg, "mlflow_experiment", None) or "mysproj")
    parent = tracker.parent(cfg.runs[0].rstrip("/"))
    if parent is not None:
        tracker.call("report artifacts", lambda: tracker.client.log_artifacts(parent, folder, "report"))
    return tracker.record(parent)
