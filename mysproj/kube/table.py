"""The `mysproj status` table: one row per stage of a Kubernetes run's DAG, read by `mysproj.kube.runstate` from the
cluster and the bucket, as the controller reads it. Each row: its Job's state, start, duration (for a finished stage
its own wall time from the output's manifest), throughput, progress (`mysproj.kube.progress`) and the reason of a
failure or of a replaced pod. Without the bucket (`bucket=False`) the table shows what the cluster knows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mysproj.errors import BadInput
from mysproj.kube import jobspec, runstate
from mysproj.kube.controller import read_pipeline
from mysproj.kube.progress import duration, progress, seconds, stage_time
from mysproj.pipeline import dag
from mysproj.stages.registry import node_configs


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
    throughput: str = ""


def find_configmap(cluster, release: str) -> str:
    items = cluster.list_configmaps(f"{jobspec.LABEL_RUN}={release},app.kubernetes.io/component=pipeline")
    if not items:
        raise BadInput(f"no mysproj run named '{release}' in namespace {cluster.namespace} "
                       f"(no ConfigMap labelled {jobspec.LABEL_RUN}={release}); check `helm list`")
    return items[0]["metadata"]["name"]


def read_run(cluster, release: str, *, bucket: bool = True, complete: dict | None = None,
             manifests: bool = False) -> runstate.RunState:
    """The run's state (`runstate.read`) over the DAG its ConfigMap describes."""
    pipeline, _ = read_pipeline(cluster, find_configmap(cluster, release))
    nodes = dag.build(pipeline)
    return runstate.read(cluster, release, nodes, node_configs(nodes), bucket=bucket, complete=complete,
                         manifests=manifests)


def collect(cluster, release: str, bucket: bool = True, complete: dict[tuple[str, str], dict] | None = None
            ) -> list[Row]:
    """The status table's rows: the current controller Job, then every node of the DAG. `bucket=False`: from the
    cluster only. `complete`: the outputs found complete by an earlier call of a poll (`runstate.read`), added to."""
    run = read_run(cluster, release, bucket=bucket, complete=complete, manifests=bucket)
    now = datetime.now(timezone.utc)
    rows: list[Row] = []
    if run.controller is not None:
        j = run.controller
        st = jobspec.classify(j, run.pods.get(j["metadata"]["name"], []))
        rows.append(Row("controller", "controller", j["metadata"]["name"], st.state, st.start or "",
                        duration(st.start, st.end, now), "", st.reason))
    for name, stage in run.stages.items():
        st = stage.state
        busy = st.state in ("running", "pending", "failed") and bucket
        wall, rate = stage_time(stage.manifest)
        took = seconds(wall) if wall is not None else duration(st.start, st.end, now)
        reason = st.reason
        if stage.replaced:
            replaced = f"{stage.replaced} pod(s) replaced (last: {stage.last_replaced})"
            reason = f"{reason}; {replaced}" if reason else replaced
        rows.append(Row(name, stage.node.stage, ",".join(j["metadata"]["name"] for j in stage.jobs), st.state,
                        st.start or "", took, progress(stage.cfg.out) if busy else "", reason, rate))
    return rows


def render(rows: list[Row]) -> str:
    header = ("STAGE", "JOB", "STATE", "START", "DURATION", "THROUGHPUT", "PROGRESS", "REASON")
    table = [header] + [(r.node, r.job or "-", r.state, r.start.replace("T", " ").rstrip("Z"), r.duration,
                         r.throughput, r.progress, r.reason) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1]) for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(line.rstrip() for line in lines)
