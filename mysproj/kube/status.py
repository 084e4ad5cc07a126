"""`mysproj status RELEASE [--watch]` and `mysproj logs RELEASE STAGE`: what a run is doing, read by
`mysproj.kube.runstate` from the cluster and the bucket, as the controller reads it; `wait` follows a run to its
end for `mysproj reproduce`.

One row per stage of the DAG: its Job's state, start, duration (for a finished stage its own wall time from the
output's manifest), throughput, progress (the latest line of the stage's `metrics.jsonl` in object storage) and the
reason of a failure or of a replaced pod. The bucket is reached the way the run's pods reach it (the release's
endpoint and region) with this shell's credentials; without them the table shows what the cluster knows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import datetime, timezone

from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.kube import jobspec, runstate
from mysproj.kube.controller import read_pipeline
from mysproj.pipeline import dag
from mysproj.stages.registry import node_configs
from mysproj.storage import join, read_text
from mysproj.storage.uri import is_local, s3_endpoint, split

log = logging.getLogger(__name__)


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


def stage_time(manifest: dict | None) -> tuple[float | None, str]:
    """(wall seconds, "<throughput> <unit>") of a finished stage from its manifest's summary; older manifests have
    no `time` entry (only `seconds`), and a stage without a natural unit has no throughput."""
    timing = summary_of(manifest).timing
    wall = timing.get("wall_s")
    rate, unit = timing.get("throughput"), timing.get("unit")
    wall = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and unit:
        return wall, f"{rate:.3g} {unit}"
    return wall, ""


def collect(cluster, release: str, bucket: bool = True, complete: dict[tuple[str, str], dict] | None = None
            ) -> list[Row]:
    """The status table's rows: the current controller Job, then every node of the DAG. `bucket=False`: from the
    cluster only. `complete`: the outputs found complete by an earlier call of a poll (`runstate.read`), added to."""
    pipeline, _ = read_pipeline(cluster, find_configmap(cluster, release))
    nodes = dag.build(pipeline)
    run = runstate.read(cluster, release, nodes, node_configs(nodes), bucket=bucket, complete=complete,
                        manifests=bucket)
    now = datetime.now(timezone.utc)
    rows: list[Row] = []
    if run.controller is not None:
        j = run.controller
        st = jobspec.classify(j, run.pods.get(j["metadata"]["name"], []))
        rows.append(Row("controller", "controller", j["metadata"]["name"], st.state, st.start or "",
                        _duration(st.start, st.end, now), "", st.reason))
    for name, stage in run.stages.items():
        st = stage.state
        busy = st.state in ("running", "pending", "failed") and bucket
        wall, rate = stage_time(stage.manifest)
        duration = _seconds(wall) if wall is not None else _duration(st.start, st.end, now)
        reason = st.reason
        if stage.replaced:
            replaced = f"{stage.replaced} pod(s) replaced (last: {stage.last_replaced})"
            reason = f"{reason}; {replaced}" if reason else replaced
        rows.append(Row(name, stage.node.stage, ",".join(j["metadata"]["name"] for j in stage.jobs), st.state,
                        st.start or "", duration, progress(stage.cfg.out) if busy else "", reason, rate))
    return rows


def _template_env(template: dict | None) -> tuple[dict[str, str], str]:
    """(plain env values, credentials Secret name) of the release's stage Job template."""
    try:
        env = template["spec"]["template"]["spec"]["containers"][0].get("env") or []
    except (KeyError, IndexError, TypeError):
        return {}, ""
    values = {e["name"]: str(e["value"]) for e in env if e.get("value") is not None}
    secret = next((((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name", "") for e in env
                   if e.get("name") == "AWS_ACCESS_KEY_ID"), "")
    return values, secret


def bucket_access(root: str, template: dict | None, env: MutableMapping[str, str] = os.environ) -> str:
    """Point this process at the run's bucket the way the run's pods reach it (the endpoint and region of the
    release's Job template, where this shell sets none) and try one read: '' when it works, else what is
    missing, in a few words. One attempt: a bucket that does not answer is reported, not waited for."""
    if is_local(root):
        return ""
    release_env, secret = _template_env(template)
    if not s3_endpoint(env) and release_env.get("MYSPROJ_S3_ENDPOINT"):
        env["MYSPROJ_S3_ENDPOINT"] = release_env["MYSPROJ_S3_ENDPOINT"]
    if not (env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")) and release_env.get("AWS_DEFAULT_REGION"):
        env["AWS_DEFAULT_REGION"] = release_env["AWS_DEFAULT_REGION"]
    endpoint = s3_endpoint(env) or "AWS S3"
    try:
        fs, path = split(root)
        fs.exists(path)
        return ""
    except Exception as e:  # noqa: BLE001 - whatever stops the read, the table still shows the cluster's view
        kind = type(e).__name__
        if kind == "NoCredentialsError":
            where = f" (the run's pods read them from Secret {secret})" if secret else ""
            why = f"no S3 credentials in this shell: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{where}"
        elif isinstance(e, PermissionError):
            why = f"{endpoint} refused this shell's S3 credentials (access denied)"
        elif any(k in kind for k in ("Endpoint", "Connect", "Timeout")) or isinstance(e, (ConnectionError,
                                                                                           TimeoutError)):
            why = f"{endpoint} is not reachable from here ({kind}); set MYSPROJ_S3_ENDPOINT to an address that is"
        else:
            why = f"{kind}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return why


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


def show(cluster, release: str, watch: bool = False, interval: float = 10.0, out=print) -> int:
    """Print the table (again every `interval` s with --watch until no stage is pending or running); the exit code
    is 1 when a stage failed, so scripts can gate on it."""
    pipeline, templates = read_pipeline(cluster, find_configmap(cluster, release))
    problem = bucket_access(pipeline.root, templates.get("cpu"))
    complete: dict[tuple[str, str], dict] = {}
    while True:
        rows = collect(cluster, release, bucket=not problem, complete=complete)
        if problem:
            out(f"bucket {pipeline.root} not read: {problem}; the table shows what the cluster knows")
        out(render(rows))
        busy = any(r.state in ("pending", "running") for r in rows)
        if not watch or not busy:
            return 1 if any(r.state == "failed" for r in rows) else 0
        time.sleep(interval)
        out("")


def wait(cluster, release: str, timeout: float, interval: float, out=print) -> tuple[str, list]:
    """Poll the run like `mysproj status --watch`, printing the table whenever a stage changes state (and a one-line
    heartbeat at least every minute); returns ('complete' | 'failed' | 'timeout', last rows)."""
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
                done = sum(r.state in ("complete", "reused") for r in rows if r.stage != "controller")
                running = [r.node + (f" ({r.progress})" if r.progress else "") for r in rows if r.state == "running"]
                out(f"[{now - t0:.0f}s] {done}/{len(rows) - 1} stages done; running: {', '.join(running) or '-'}")
                last_print = now
            ctl = next((r for r in rows if r.stage == "controller"), None)
            stage_failed = any(r.state == "failed" for r in rows if r.stage != "controller")
            if ctl is not None and ctl.state == "complete":
                return "complete", rows
            if (ctl is not None and ctl.state == "failed") or stage_failed:
                return "failed", rows
        if time.monotonic() >= deadline:
            return "timeout", rows
        time.sleep(interval)


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
            out(cluster.pod_log(pod["metadata"]["name"], tail_lines=tail).removesuffix("\n"))
        except Exception as e:  # noqa: BLE001 - a node without a log endpoint must not hide the other Jobs' logs
            out(f"(no log: {getattr(e, 'reason', None) or e})")
    return 0
