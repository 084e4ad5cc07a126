"""Kubernetes Events on the controller's Job telling the story of a run, so `kubectl describe job
<release>-controller` and `kubectl get events --field-selector involvedObject.name=<release>-controller` show it:
each stage started (its Job created), done (wall time and throughput from its manifest), skipped (complete
already), retried (a failed attempt its Job retries) and failed (the reason line); the run complete or failed.

An Event's name derives from what it tells (the node, its Job, the attempt), so a restarted controller re-telling
the same story creates nothing twice (the API answers 409). Events are a view: one that cannot be written (an API
blip, a Role without `events`) is a warning line, never a failed run.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from datetime import datetime, timezone

from mysproj.config.registry import summary_of
from mysproj.kube import jobspec
from mysproj.kube.runstate import RunState, complete_output

log = logging.getLogger(__name__)
SOURCE = "mysproj-controller"
MAX_MESSAGE = 1024  # the API server's limit on an Event's message


def _seconds(secs: float) -> str:
    h, rem = divmod(max(int(secs), 0), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s" if h else f"{rem // 60}m{rem % 60:02d}s"


def done_message(node: str, manifest: dict | None) -> str:
    """`stage X done in 1m02s (12.3 samples/s)` from the output's manifest (its `time` entry)."""
    timing = summary_of(manifest).timing
    text = f"stage {node} done"
    wall = timing.get("wall_s")
    if isinstance(wall, (int, float)) and not isinstance(wall, bool):
        text += f" in {_seconds(wall)}"
    rate, unit = timing.get("throughput"), timing.get("unit")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and unit:
        text += f" ({rate:.3g} {unit})"
    return text


class EventRecorder:
    """Events about one run on its controller Job (`job`: that Job as the API returns it)."""

    def __init__(self, cluster, job: dict, release: str):
        self.cluster = cluster
        meta = job["metadata"]
        self.job, self.release = meta["name"], release
        self.involved = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                         "namespace": meta.get("namespace") or cluster.namespace, "uid": meta.get("uid")}
        self.sent: set[str] = set()
        self.warned = False

    def record(self, key: str, reason: str, message: str, warning: bool = False) -> None:
        """One Event, at most once per `key` for this Job."""
        if key in self.sent:
            return
        name = f"{self.job}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "labels": {jobspec.LABEL_RUN: self.release}},
                "involvedObject": self.involved, "reason": reason, "message": message[:MAX_MESSAGE],
                "type": "Warning" if warning else "Normal", "count": 1, "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": SOURCE, "host": socket.gethostname()}}
        try:
            self.cluster.create_event(body)  # False: there already (told before a restart)
        except Exception as e:  # noqa: BLE001 - an Event is a view of the run; the run goes on without it
            if not self.warned:
                log.warning("could not record Events on Job %s (%s: %s); the run goes on without them",
                            self.job, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self.warned = True
            return
        self.sent.add(key)

    def observe(self, run: RunState, created: dict[str, list[str]]) -> None:
        """The Events of one controller pass: `created` maps each node whose Jobs this pass created to their names."""
        for name, st in run.stages.items():
            state = st.state
            jobs = ",".join(j["metadata"]["name"] for j in st.jobs)
            # A failed attempt the Job retried, also where the retry already finished by this pass.
            for job, js in zip(st.jobs, st.job_states):
                failed = int((job.get("status") or {}).get("failed") or 0)
                if failed and not js.final:
                    why = js.reason if js.reason.startswith("retrying") else f"{failed} failed attempt(s)"
                    self.record(f"retried/{name}/{job['metadata']['name']}/{failed}", "StageRetried",
                                f"stage {name}: {why}; Job {job['metadata']['name']} retried it", warning=True)
            if name in created:
                self.record(f"started/{name}/{created[name][0]}", "StageStarted",
                            f"stage {name} started: Job {', '.join(created[name])}")
            elif state.state == "complete":
                key = f"done/{name}/{jobs}"
                if key not in self.sent:
                    self.record(key, "StageDone", done_message(name, complete_output(st.node, st.cfg)))
            elif state.state == "reused":
                self.record(f"skipped/{name}/{(st.manifest or {}).get('config_hash', '')}", "StageSkipped",
                            f"stage {name} skipped: its output is complete already with this config")
            elif state.state == "failed" and state.final:
                self.record(f"failed/{name}/{jobs}", "StageFailed", f"stage {name} failed: {state.reason}",
                            warning=True)

    def run_done(self, stages: int) -> None:
        self.record("run/complete", "RunComplete", f"run {self.release} complete: {stages} stages")

    def run_failed(self, reason: str) -> None:
        self.record("run/failed", "RunFailed", f"run {self.release} failed: {reason}", warning=True)
