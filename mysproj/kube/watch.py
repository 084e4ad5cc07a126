"""Following a Kubernetes run: `mysproj status [--watch]` prints the table (again until no stage is pending or
running), and `wait` follows a run to its end for `mysproj reproduce`. Both reach the bucket as the run's pods do
(`mysproj.kube.bucket`) and keep the outputs found complete across polls."""

from __future__ import annotations

import logging
import time

from mysproj.errors import BadInput
from mysproj.kube import bucket
from mysproj.kube.controller import read_pipeline
from mysproj.kube.table import collect, find_configmap, render

log = logging.getLogger(__name__)


def show(cluster, release: str, watch: bool = False, interval: float = 10.0, out=print) -> int:
    """Print the table (again every `interval` s with --watch until no stage is pending or running); the exit code
    is 1 when a stage failed, so scripts can gate on it."""
    pipeline, templates = read_pipeline(cluster, find_configmap(cluster, release))
    access = bucket.bucket_access(pipeline.root, templates.get("cpu"))
    complete: dict[tuple[str, str], dict] = {}
    with bucket.using(access.settings):
        while True:
            rows = collect(cluster, release, bucket=not access.problem, complete=complete)
            if access.problem:
                out(f"bucket {pipeline.root} not read: {access.problem}; the table shows what the cluster knows")
            out(render(rows))
            busy = any(r.state in ("pending", "running") for r in rows)
            if not watch or not busy:
                return 1 if any(r.state == "failed" for r in rows) else 0
            time.sleep(interval)
            out("")


def wait(cluster, release: str, timeout: float, interval: float, out=print) -> tuple[str, list]:
    """Poll the run like `mysproj status --watch`, printing the table whenever a stage changes state (and a one-line
    heartbeat at least every minute); returns ('complete' | 'failed' | 'timeout', last rows). The caller applies
    the bucket's settings (`bucket.using`)."""
    deadline = time.monotonic() + timeout
    t0 = last_print = time.monotonic()
    last_states = None
    rows: list = []
    complete: dict[tuple[str, str], dict] = {}
    while True:
        try:
            rows = collect(cluster, release, complete=complete)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - an API server or bucket blip must not end the wait
            log.warning("status: %s: %s; retrying", type(e).__name__, e)
            rows = rows or []
        else:
            states = [(r.node, r.state) for r in rows]
            now = time.monotonic()
            if states != last_states:
                out(render(rows))
                out("")
                last_states, last_print = states, now
            elif now - last_print >= 60:
                out(_heartbeat(rows, now - t0))
                last_print = now
            ended = _ended(rows)
            if ended:
                return ended, rows
        if time.monotonic() >= deadline:
            return "timeout", rows
        time.sleep(interval)


def _heartbeat(rows: list, elapsed: float) -> str:
    done = sum(r.state in ("complete", "reused") for r in rows if r.stage != "controller")
    running = [r.node + (f" ({r.progress})" if r.progress else "") for r in rows if r.state == "running"]
    return f"[{elapsed:.0f}s] {done}/{len(rows) - 1} stages done; running: {', '.join(running) or '-'}"


def _ended(rows: list) -> str | None:
    """'complete' once the controller completed, 'failed' once it or a stage failed, else None."""
    ctl = next((r for r in rows if r.stage == "controller"), None)
    stage_failed = any(r.state == "failed" for r in rows if r.stage != "controller")
    if ctl is not None and ctl.state == "complete":
        return "complete"
    if (ctl is not None and ctl.state == "failed") or stage_failed:
        return "failed"
    return None
