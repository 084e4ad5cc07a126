"""`mysproj logs RELEASE STAGE`: the newest pod's log of each Job of a stage node (`textures-mini/prep`), of every
node of a stage kind (`prep`), of one Job by name, or of the controller (`controller`). The Jobs are the run's
current ones as `mysproj.kube.runstate` picks them (the current controller's; an older Helm revision's, being
removed, never count), the same reader behind `mysproj status` and the controller."""

from __future__ import annotations

from mysproj.errors import BadInput
from mysproj.kube.table import read_run


def chosen_jobs(run, stage: str) -> list[dict]:
    """The Jobs `stage` names in the run's state: a node, a stage kind, a Job name, or 'controller'."""
    jobs = [run.controller] if run.controller is not None and stage == "controller" else []
    for state in run.stages.values():
        if stage in (state.node.name, state.node.stage):
            jobs += state.jobs
        else:
            jobs += [j for j in state.jobs if j["metadata"]["name"] == stage]
    if run.controller is not None and run.controller["metadata"]["name"] == stage:
        jobs.append(run.controller)
    return jobs


def logs(cluster, release: str, stage: str, tail: int | None = None, out=print) -> int:
    run = read_run(cluster, release, bucket=False)
    chosen = chosen_jobs(run, stage)
    if not chosen:
        raise BadInput(f"run '{release}' has no Job for stage '{stage}' (yet); see `mysproj status {release}`")
    for j in chosen:
        pods = run.pods.get(j["metadata"]["name"], [])
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
