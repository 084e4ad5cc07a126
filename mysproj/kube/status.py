"""`mysproj status RELEASE [--watch]` and `mysproj logs RELEASE STAGE`: what a run is doing, from the cluster and the
bucket only (the same sources the controller derives its state from).

One row per stage of the DAG: its Job's state, start, duration, progress (the latest line of the stage's
`metrics.jsonl` in object storage) and, for a failed stage, the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from mysproj.errors import BadInput
from mysproj.kube import jobspec
from mysproj.kube.controller import FINISHED, output_complete, read_failure_record, read_pipeline, stage_config
from mysproj.pipeline import dag
from mysproj.storage import join, read_text


@dataclass
class Row:
    node: str
    stage: str
    job: str
    state: str
    start: str
    duration: str
    progress: str
    reason: str


def find_configmap(cluster, release: str) -> str:
    items = cluster.list_configmaps(f"{jobspec.LABEL_RUN}={release},app.kubernetes.io/component=pipeline")
    if not items:
        raise BadInput(f"no mysproj run named '{release}' in namespace {cluster.namespace} "
                       f"(no ConfigMap labelled {jobspec.LABEL_RUN}={release}); check `helm list`")
    return items[0]["metadata"]["name"]


def _parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _duration(start: str | None, end: str | None, now: datetime) -> str:
    t0 = _parse_time(start)
    if t0 is None:
        return ""
    return _seconds(((_parse_time(end) or now) - t0).total_seconds())


def _seconds(secs: float) -> str:
    h, rem = divmod(max(int(secs), 0), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def progress(out: str) -> str:
    """`step 40/200 loss 1.234 eta 5m` from the last line of `<out>/metrics.jsonl`, if the stage writes one."""
    try:
        lines = [ln for ln in read_text(join(out, "metrics.jsonl")).splitlines() if ln.strip()]
        last = json.loads(lines[-1])
    except (BadInput, FileNotFoundError, IndexError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    parts = []
    if "step" in last:
        parts.append(f"step {last['step']}" + (f"/{last['total']}" if last.get("total") else ""))
    if isinstance(last.get("loss"), (int, float)):
        parts.append(f"loss {last['loss']:.4g}")
    if isinstance(last.get("samples_per_s"), (int, float)):
        parts.append(f"{last['samples_per_s']:.3g} samples/s")
    if isinstance(last.get("eta_s"), (int, float)):
        parts.append(f"eta {_seconds(last['eta_s'])}")
    return " ".join(parts)


def collect(cluster, release: str) -> list[Row]:
    pipeline, _ = read_pipeline(cluster, find_configmap(cluster, release))
    nodes = dag.build(pipeline)
    selector = f"{jobspec.LABEL_RUN}={release}"
    jobs = cluster.list_jobs(selector)
    pods: dict[str, list[dict]] = {}
    for p in cluster.list_pods(selector):
        pods.setdefault(((p.get("metadata") or {}).get("labels") or {}).get("job-name", ""), []).append(p)
    by_node: dict[str, list[dict]] = {}
    for j in jobs:
        node = ((j["metadata"].get("annotations")) or {}).get(jobspec.ANN_NODE)
        by_node.setdefault(node or j["metadata"]["name"], []).append(j)
    now = datetime.now(timezone.utc)
    rows: list[Row] = []
    controller = [j for j in jobs if (j["metadata"].get("labels") or {}).get(jobspec.LABEL_STAGE) == "controller"]
    for j in controller:
        st = jobspec.classify(j, pods.get(j["metadata"]["name"], []))
        rows.append(Row("controller", "controller", j["metadata"]["name"], st.state, st.start or "",
                        _duration(st.start, st.end, now), "", st.reason))
    states: dict[str, str] = {}
    for node in nodes:
        cfg = stage_config(node)
        present = sorted(by_node.get(node.name, []), key=lambda j: j["metadata"].get("creationTimestamp") or "")
        if present:
            job_states = []
            for j in present:
                st = jobspec.classify(j, pods.get(j["metadata"]["name"], []))
                if st.state not in FINISHED and pods.get(j["metadata"]["name"]):
                    st = jobspec.classify(j, pods.get(j["metadata"]["name"], []), read_failure_record(cfg.out))
                job_states.append(st)
            st = jobspec.combine(job_states)
            job_name = ",".join(j["metadata"]["name"] for j in present)
        elif all(states.get(d) in FINISHED for d in node.deps) and output_complete(node, cfg):
            st, job_name = jobspec.JobState("reused"), ""
        else:
            st, job_name = jobspec.JobState("waiting"), ""
        states[node.name] = st.state
        prog = progress(cfg.out) if st.state in ("running", "pending", "failed") else ""
        rows.append(Row(node.name, node.stage, job_name, st.state, st.start or "",
                        _duration(st.start, st.end, now), prog, st.reason))
    return rows


def render(rows: list[Row]) -> str:
    header = ("STAGE", "JOB", "STATE", "START", "DURATION", "PROGRESS", "REASON")
    table = [header] + [(r.node, r.job or "-", r.state, r.start.replace("T", " ").rstrip("Z"), r.duration,
                         r.progress, r.reason) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1]) for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(line.rstrip() for line in lines)


def show(cluster, release: str, watch: bool = False, interval: float = 10.0, out=print) -> int:
    """Print the table (again every `interval` s with --watch until no stage is pending or running); the exit code
    is 1 when a stage failed, so scripts can gate on it."""
    while True:
        rows = collect(cluster, release)
        out(render(rows))
        busy = any(r.state in ("pending", "running") for r in rows)
        if not watch or not busy:
            return 1 if any(r.state == "failed" for r in rows) else 0
        time.sleep(interval)
        out("")


def logs(cluster, release: str, stage: str, tail: int | None = None, out=print) -> int:
    """Logs of the newest pod of each Job of a stage node (`textures-mini/prep`), or of every node of a stage kind
    (`prep`), or of the controller (`controller`)."""
    jobs = cluster.list_jobs(f"{jobspec.LABEL_RUN}={release}")
    chosen = [j for j in jobs
              if ((j["metadata"].get("annotations")) or {}).get(jobspec.ANN_NODE) == stage
              or (j["metadata"].get("labels") or {}).get(jobspec.LABEL_STAGE) == stage
              or j["metadata"]["name"] == stage]
    if not chosen:
        raise BadInput(f"run '{release}' has no Job for stage '{stage}' (yet); see `mysproj status {release}`")
    for j in chosen:
        pods = cluster.list_pods(f"job-name={j['metadata']['name']}")
        if not pods:
            out(f"== {j['metadata']['name']}: no pod yet")
            continue
        pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")
        out(f"== {j['metadata']['name']} / {pod['metadata']['name']}")
        try:
            out(cluster.pod_log(pod["metadata"]["name"], tail_lines=tail))
        except Exception as e:  # noqa: BLE001 - a node without a log endpoint must not hide the other Jobs' logs
            out(f"(no log: {getattr(e, 'reason', None) or e})")
    return 0
