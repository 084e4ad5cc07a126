"""Each stage's state of a Kubernetes run, from the cluster (its Jobs and pods) and the bucket (output manifests and
failure records): the one reader behind the controller's passes, `mysproj status` and `mysproj reproduce`.

- A node's Jobs are the run's stage Jobs annotated with its name and config hash (its Job names derive from both)
  and owned by the run's current controller Job, the newest Helm revision's: Jobs an older revision's controller
  created, which the garbage collector is removing, never count.
- A node with Jobs has their state (`jobspec.classify`); where a Job failed, the stage's `_FAILURE.json` in the
  bucket adds the exit code and reason a node without a kubelet may not report.
- A node without a Job is waiting until every dependency finished; then it is reused when its output is complete
  with this config (`StageOutput.existing`), else ready: the controller creates its Jobs.
- A pod deleted before it finished (eviction, drain, `kubectl delete pod`) is replaced by its Job without a trace
  in the Job's status; the controller records each one on the Job, and this reader counts those and the pods
  being deleted right now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from mysproj.config.fields import config_hash
from mysproj.errors import BadInput
from mysproj.kube import jobspec
from mysproj.pipeline import dag
from mysproj.storage import join, read_text
from mysproj.storage.manifest import StageOutput

FINISHED = ("complete", "reused")
LABEL_REVISION = "mysproj.io/revision"
ANN_REPLACED = "mysproj.io/replaced-pods"         # how many of the Job's pods were deleted before they finished
ANN_LAST_REPLACED = "mysproj.io/last-replaced"    # the last one: "pod <name> <why> while <phase> at <time>"


@dataclass
class StageState:
    node: dag.Node
    cfg: Any
    state: jobspec.JobState
    jobs: list[dict] = field(default_factory=list)                    # the node's current Jobs, oldest first
    job_states: list[jobspec.JobState] = field(default_factory=list)  # one per Job
    ready: bool = False          # no Job, dependencies finished, output not complete: its Jobs are to be created
    replaced: int = 0            # pods deleted before they finished
    last_replaced: str = ""
    manifest: dict | None = None  # the complete output's manifest, where it was read


@dataclass
class RunState:
    stages: dict[str, StageState]        # DAG order
    controller: dict | None              # the current controller Job
    superseded: bool                     # a newer revision's controller Job exists beside the asked-for one
    pods: dict[str, list[dict]]          # the run's pods by Job name

    def failed(self) -> dict[str, StageState]:
        return {n: s for n, s in self.stages.items() if s.state.state == "failed" and s.state.final}


def read_failure_record(out: str) -> dict | None:
    try:
        return json.loads(read_text(join(out, jobspec.FAILURE_RECORD)))
    except (FileNotFoundError, json.JSONDecodeError, BadInput):
        return None


def complete_output(node: dag.Node, cfg: Any) -> dict | None:
    """The manifest of `node`'s output where it is complete with this config: what `run_stage` skips on."""
    try:
        return StageOutput(cfg.out, node.stage, cfg).existing()
    except BadInput:  # an input that cannot be digested now: the stage's own run says why
        return None


def _revision(job: dict) -> tuple[int, str]:
    meta = job.get("metadata") or {}
    rev = (meta.get("labels") or {}).get(LABEL_REVISION, "")
    return (int(rev) if rev.isdigit() else 0, meta.get("creationTimestamp") or "")


def read(cluster, release: str, nodes: list[dag.Node], configs: dict[str, Any], *, controller_job: str = "",
         bucket: bool = True, complete: dict[tuple[str, str], dict] | None = None,
         manifests: bool = False) -> RunState:
    """The run's state now. `controller_job`: the controller whose stage Jobs count (default: the newest
    revision's). `bucket=False` reads the cluster only: a node without a Job whose dependencies finished is then
    `unknown` (reused or not started). `complete`: (node name, config hash) -> manifest of each output already
    found complete, consulted before the bucket and added to: a cache of positive checks that a caller polling the
    run keeps across reads (by config hash too, as a `helm upgrade` may change a node's config between two).
    `manifests`: also read the manifest of nodes whose Jobs completed."""
    complete = {} if complete is None else complete
    jobs = cluster.list_jobs(f"{jobspec.LABEL_RUN}={release}")
    pods: dict[str, list[dict]] = {}
    for p in cluster.list_pods(f"{jobspec.LABEL_RUN}={release}"):
        pods.setdefault(labels_of(p).get("job-name", ""), []).append(p)
    controllers = sorted((j for j in jobs if labels_of(j).get(jobspec.LABEL_STAGE) == "controller"), key=_revision)
    controller = next((j for j in controllers if j["metadata"]["name"] == controller_job), None) \
        if controller_job else None
    controller = controller or (controllers[-1] if controllers else None)
    superseded = bool(controllers) and controller is not controllers[-1]
    owner_uid = controller["metadata"].get("uid") if controller else None
    by_node: dict[tuple[str, str], list[dict]] = {}
    earlier: set[tuple[str, str]] = set()  # (node, config hash) of an earlier revision's Jobs still present
    for j in jobs:
        ann = j["metadata"].get("annotations") or {}
        if labels_of(j).get("app.kubernetes.io/component") != "stage":
            continue
        key = (ann.get(jobspec.ANN_NODE, ""), ann.get(jobspec.ANN_HASH, ""))
        if _owned_by(j, owner_uid):
            by_node.setdefault(key, []).append(j)
        else:
            earlier.add(key)

    stages: dict[str, StageState] = {}
    for node in nodes:
        cfg = configs[node.name]
        key = (node.name, config_hash(cfg))
        present = sorted(by_node.get(key, []), key=lambda j: j["metadata"].get("creationTimestamp") or "")
        if present:
            st = stages[node.name] = _with_jobs(node, cfg, present, pods, bucket)
            if manifests and bucket and st.state.state == "complete":
                st.manifest = _complete_output(node, cfg, key, complete)
            continue
        deps = [stages[d].state.state for d in node.deps]
        if not all(s in FINISHED or s == "unknown" for s in deps):
            stages[node.name] = StageState(node, cfg, jobspec.JobState("waiting"))
        elif not bucket:
            stages[node.name] = StageState(node, cfg, jobspec.JobState("unknown"))
        elif (manifest := _complete_output(node, cfg, key, complete)) is not None:
            stages[node.name] = StageState(node, cfg, jobspec.JobState("reused"), manifest=manifest)
        else:
            # Its Job names are still taken while the garbage collector removes an earlier revision's Jobs.
            why = "an earlier revision's Job of this stage is being removed" if key in earlier else ""
            stages[node.name] = StageState(node, cfg, jobspec.JobState("waiting", reason=why), ready=True)
    return RunState(stages, controller, superseded, pods)


def _complete_output(node: dag.Node, cfg: Any, key: tuple[str, str], cache: dict[tuple[str, str], dict]) -> dict | None:
    if key not in cache and (manifest := complete_output(node, cfg)) is not None:
        cache[key] = manifest
    return cache.get(key)


def _with_jobs(node: dag.Node, cfg: Any, present: list[dict], pods: dict[str, list[dict]],
               bucket: bool) -> StageState:
    record = None
    if bucket and any(_failed_somehow(j, pods.get(j["metadata"]["name"], [])) for j in present):
        record = read_failure_record(cfg.out)
    job_states = [jobspec.classify(j, pods.get(j["metadata"]["name"], []), record) for j in present]
    st = StageState(node, cfg, jobspec.combine(job_states), present, job_states)
    for j, js in zip(present, job_states):
        count, last = _replaced_pods(j, pods.get(j["metadata"]["name"], []), js)
        st.replaced += count
        st.last_replaced = last or st.last_replaced
    return st


def _failed_somehow(job: dict, pods: list[dict]) -> bool:
    """Whether the stage's failure record could tell more: a Job not complete, not already ended with a reason, with
    a failed pod or a Failed condition."""
    status = job.get("status") or {}
    if int(status.get("succeeded") or 0) > 0 or jobspec.ANN_FAILURE in (job["metadata"].get("annotations") or {}):
        return False
    failed_cond = any(c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions") or [])
    return failed_cond or any((p.get("status") or {}).get("phase") == "Failed" for p in pods)


def being_replaced(job: dict, pods: list[dict], state: jobspec.JobState) -> list[tuple[str, str]]:
    """(pod name, what happened) for each pod of a pending or running Job that is being deleted before it finished:
    the Job starts another one in its place."""
    if state.state not in ("pending", "running"):
        return []  # a stopped, failed or finished Job deletes its pods without replacing them
    found = []
    for p in pods:
        meta, status = p.get("metadata") or {}, p.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase == "Failed" and ended_by_deletion(p):
            phase = "Running"  # a kubelet reports the process its SIGTERM ended as a failure
        if meta.get("deletionTimestamp") and phase not in ("Succeeded", "Failed"):
            disruption = next((c for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"), {})
            why = (status.get("reason") or disruption.get("reason") or "deleted").lower()
            found.append((meta["name"], f"pod {meta['name']} {why} while {phase} at {meta['deletionTimestamp']}"))
    return found


def ended_by_deletion(pod: dict) -> bool:
    """Whether a pod being deleted stopped because of its deletion: a container of it ended after the deletion was
    asked for (its deletionTimestamp less the grace period the deletion gave it)."""
    meta = pod.get("metadata") or {}
    if not meta.get("deletionTimestamp"):
        return False
    try:
        asked = datetime.fromisoformat(meta["deletionTimestamp"]) \
            - timedelta(seconds=int(meta.get("deletionGracePeriodSeconds") or 0))
        ends = [datetime.fromisoformat(c["state"]["terminated"]["finishedAt"])
                for c in (pod.get("status") or {}).get("containerStatuses") or []
                if ((c.get("state") or {}).get("terminated") or {}).get("finishedAt")]
    except (TypeError, ValueError):
        return False
    return any(end >= asked for end in ends)


def _replaced_pods(job: dict, pods: list[dict], state: jobspec.JobState) -> tuple[int, str]:
    """(count, last) of a Job's pods deleted before they finished: those the controller recorded on the Job plus
    those being deleted now that it has not recorded yet."""
    ann = job["metadata"].get("annotations") or {}
    count = int(ann.get(ANN_REPLACED, "0") or 0)
    last = ann.get(ANN_LAST_REPLACED, "")
    for pod, what in being_replaced(job, pods, state):
        if f"pod {pod} " not in last:
            count, last = count + 1, what
    return count, last


def _owned_by(job: dict, uid: str | None) -> bool:
    refs = [r for r in job["metadata"].get("ownerReferences") or [] if r.get("kind") == "Job"]
    return uid is None or not refs or any(r.get("uid") == uid for r in refs)


def labels_of(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}
