"""One reader of a run's state (`mysproj.kube.runstate`) behind the controller and `mysproj status`: they agree where
they used to disagree (Jobs of an earlier config or revision), a replaced pod leaves a trace, the table shows each
finished stage's own time and throughput, and without the bucket the cluster's view still shows. The real API
server and S3 server run the same code in tests/kube/test_pipeline_e2e.py."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
from fake_cluster import TEMPLATE, complete_output, make_controller

from mysproj.kube import bucket, jobspec, runstate, table, watch
from mysproj.storage.manifest import StageOutput

FT = "textures-mini/ft-projector/seed0/finetune"
READY = ("textures-mini/prep", "models/tiny", "models/clip-tiny")


def rows_of(cluster, **kw):
    return {r.node: r for r in table.collect(cluster, "r1", **kw)}


def _earlier_finetune_job(ctl, cluster, status: dict) -> str:
    """A finetune Job of an earlier config of the node (another max_steps) left in the namespace, as `status` says."""
    node = next(n for n in ctl.nodes if n.name == FT)
    earlier = dataclasses.replace(ctl.configs[FT], max_steps=1)
    name = jobspec.job_names("r1-mysproj", node, earlier)[0]
    cluster.jobs[name] = {**jobspec.stage_job(TEMPLATE, name=name, node=node, cfg=earlier, owner=None, gpu=True),
                          "status": status}
    return name


def test_status_and_the_controller_agree_when_a_job_of_an_earlier_config_is_left(tmp_path):
    """A finetune Job of an earlier install (another max_steps) that failed for bad input is still in the namespace.
    The controller never counted it (its Jobs are named by config); `mysproj status` matched Jobs by node alone
    and reported the stage, and the run, as failed while the controller ran the new config."""
    ctl, cluster = make_controller(tmp_path)
    for node in READY:
        complete_output(ctl, node)
    _earlier_finetune_job(ctl, cluster, {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                                     "reason": "BackoffLimitExceeded"}]})
    result = ctl.step()
    assert result.states[FT].state == "pending" and ctl.names[FT][0] in result.created
    row = rows_of(cluster)[FT]
    assert (row.state, row.job) == ("running", ctl.names[FT][0])
    assert ctl.step().states[FT].state == row.state
    assert watch.show(cluster, "r1", out=lambda s: None) == 0


def test_logs_picks_the_jobs_the_run_state_counts(tmp_path):
    """`mysproj logs` reads the same run state as `mysproj status`: a Job of an earlier config of the node is left
    out, a node, a stage kind, a Job name and 'controller' each name their Jobs."""
    from mysproj.errors import BadInput
    from mysproj.kube import logs

    ctl, cluster = make_controller(tmp_path)
    for node in READY:
        complete_output(ctl, node)
    old = _earlier_finetune_job(ctl, cluster, {"failed": 1})
    cluster.start(old)
    ctl.step()
    current = ctl.names[FT][0]
    pod = cluster.start(current)
    printed: list[str] = []
    assert logs.logs(cluster, "r1", FT, out=printed.append) == 0
    assert printed == [f"== {current} / {pod}", f"log of {pod}"]
    for name in ("finetune", current):
        assert [j["metadata"]["name"] for j in logs.chosen_jobs(table.read_run(cluster, "r1", bucket=False), name)] \
            == [current]
    printed.clear()
    logs.logs(cluster, "r1", "controller", out=printed.append)
    assert printed == ["== r1-controller: no pod yet"]
    with pytest.raises(BadInput, match="no Job for stage 'report'"):  # it waits for the evaluations
        logs.logs(cluster, "r1", "report", out=printed.append)


def test_an_earlier_revisions_jobs_never_count_and_its_controller_stands_down(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    cluster.jobs["r1-controller"]["metadata"]["labels"][runstate.LABEL_REVISION] = "1"
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]
    cluster.finish(prep)
    # `helm upgrade`: the next revision's controller Job; the old one (and with it its stage Jobs) is being deleted.
    cluster.jobs["r1-controller-2"] = {"metadata": {"name": "r1-controller-2", "uid": "uid-ctl-2", "labels": {
        "mysproj.io/run": "r1", "mysproj.io/stage": "controller", "app.kubernetes.io/component": "controller",
        runstate.LABEL_REVISION: "2"}}, "status": {"active": 1}}
    new, _ = make_controller(tmp_path, cluster, controller_job="r1-controller-2")
    result = new.step()
    # prep's output is not complete and its Job name is still taken by the old revision's Job: wait for it to go.
    assert result.created == []
    prep_state = result.states["textures-mini/prep"]
    assert prep_state.state == "waiting" and "earlier revision" in prep_state.reason
    row = rows_of(cluster)["textures-mini/prep"]
    assert (row.state, row.reason, row.job) == ("waiting", prep_state.reason, "")
    assert rows_of(cluster)["controller"].job == "r1-controller-2"
    assert ctl.step().superseded and ctl.run() == 0  # the old controller stops instead of acting on old values
    for name in [n for n, j in cluster.jobs.items() if j["metadata"].get("ownerReferences")]:
        del cluster.jobs[name]  # the garbage collector
    assert prep in new.step().created
    assert cluster.jobs[prep]["metadata"]["ownerReferences"][0]["uid"] == "uid-ctl-2"


def test_a_deleted_and_replaced_pod_leaves_a_trace(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]
    first = cluster.start(prep)
    ctl.step()
    # Deleted (a drain, an eviction, kubectl delete pod): the Job starts another pod and keeps no count of it.
    cluster.pods[first]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:30Z"
    second = cluster.start(prep)
    trace = f"pod {first} deleted while Running at 2026-01-01T00:00:30Z"
    assert rows_of(cluster)["textures-mini/prep"].reason == f"1 pod(s) replaced (last: {trace})"
    ctl.step()  # the controller records it on the Job
    assert cluster.jobs[prep]["metadata"]["annotations"][runstate.ANN_LAST_REPLACED] == trace
    del cluster.pods[first]
    ctl.step()
    assert rows_of(cluster)["textures-mini/prep"].reason == f"1 pod(s) replaced (last: {trace})"  # counted once
    # Gone between two passes without being seen going: still counted.
    del cluster.pods[second]
    cluster.start(prep)
    ctl.step()
    cluster.finish(prep)
    row = rows_of(cluster)["textures-mini/prep"]
    assert row.state == "complete"
    assert row.reason == f"2 pod(s) replaced (last: pod {second} disappeared while Running)"
    # A Job that is stopped or done deletes its pods without replacing them: no trace.
    assert runstate.being_replaced(cluster.jobs[prep], [{"metadata": {"name": "p", "deletionTimestamp": "t"},
                                                         "status": {"phase": "Running"}}],
                                   jobspec.JobState("complete")) == []


def test_a_pod_its_deletion_ended_counts_as_replaced_not_one_that_had_failed_before(tmp_path):
    """A kubelet reports the process its SIGTERM ended as Failed while the pod object is still being deleted."""
    ctl, cluster = make_controller(tmp_path)
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]

    def deleted_pod(name: str, finished_at: str) -> dict:
        return {"metadata": {"name": name, "deletionTimestamp": "2026-01-01T00:00:30Z",
                             "deletionGracePeriodSeconds": 30},
                "status": {"phase": "Failed", "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 143, "finishedAt": finished_at}}}]}}

    # Deleted at 00:00:00 with 30 s of grace: ended at 00:00:02 by the SIGTERM, or at 23:59:50 on its own.
    pods = [deleted_pod("by-sigterm", "2026-01-01T00:00:02Z"), deleted_pod("failed-first", "2025-12-31T23:59:50Z")]
    assert runstate.being_replaced(cluster.jobs[prep], pods, jobspec.JobState("running")) == [
        ("by-sigterm", "pod by-sigterm deleted while Running at 2026-01-01T00:00:30Z")]

def test_finished_stages_show_their_own_time_and_throughput(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    complete_output(ctl, "textures-mini/prep", {"time": {"wall_s": 65.2, "gpu_s": 0.0, "throughput": 812.4,
                                                         "unit": "images/s"}})
    complete_output(ctl, "models/tiny", {"seconds": 3.5})  # an older manifest: no `time` entry
    complete_output(ctl, "models/clip-tiny", {"time": {"wall_s": 2.0, "gpu_s": 0.0, "throughput": None,
                                                       "unit": None}})
    ctl.step()
    rows = rows_of(cluster)
    assert (rows["textures-mini/prep"].state, rows["textures-mini/prep"].duration) == ("reused", "1m05s")
    assert rows["textures-mini/prep"].throughput == "812 images/s"
    assert (rows["models/tiny"].duration, rows["models/tiny"].throughput) == ("0m03s", "")
    assert (rows["models/clip-tiny"].duration, rows["models/clip-tiny"].throughput) == ("0m02s", "")
    # A stage that ran as a Job: its own wall time, not the Job's (pod start-up included).
    ft = cluster.stage_jobs()[FT]
    complete_output(ctl, FT, {"time": {"wall_s": 12.0, "gpu_s": 11.0, "throughput": 4.5, "unit": "samples/s"}})
    cluster.finish(ft)
    row = rows_of(cluster)[FT]
    assert (row.state, row.duration, row.throughput) == ("complete", "0m12s", "4.5 samples/s")
    line = next(ln for ln in table.render(list(rows_of(cluster).values())).splitlines() if ln.startswith(FT))
    assert "0m12s" in line and "4.5 samples/s" in line


def test_without_the_bucket_the_cluster_view_still_shows(tmp_path, monkeypatch):
    ctl, cluster = make_controller(tmp_path)
    for node in ("models/tiny", "models/clip-tiny"):
        complete_output(ctl, node)  # found complete by the controller: no Job of theirs
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]
    cluster.finish(prep, exit_code=137)
    # The run's outputs in a bucket this shell cannot read (the root is not part of a stage's config hash).
    data = cluster.configmaps["r1-pipeline"]["data"]
    data["pipeline.yaml"] = data["pipeline.yaml"].replace(str(tmp_path / "run"), "s3://no-such-bucket/run")

    def no_bucket(*_):
        raise AssertionError("the bucket was read")

    monkeypatch.setattr("mysproj.storage.uri.split", no_bucket)
    rows = rows_of(cluster, bucket=False)
    assert rows["controller"].state == "running"
    assert rows["textures-mini/prep"].state == "running" and "retrying" in rows["textures-mini/prep"].reason
    assert rows["models/tiny"].state == "unknown"  # reused or never started: only the bucket knows
    assert rows[FT].state == "waiting"  # prep has not finished
    assert table.render(list(rows.values())).splitlines()[-1] == "2 running, 2 unknown, 8 waiting"


def _template(endpoint: str) -> dict:
    env = [{"name": "MYSPROJ_S3_ENDPOINT", "value": endpoint}, {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
           {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "mysproj-s3", "key": "K"}}}]
    return {"spec": {"template": {"spec": {"containers": [{"name": "stage", "env": env}]}}}}


@pytest.mark.s3
def test_bucket_access_uses_the_releases_endpoint_and_says_what_is_missing(s3_server, monkeypatch, tmp_path):
    root = s3_server.create_bucket("runstate-access") + "/runs/r1"
    for var in ("MYSPROJ_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    # Credentials but no endpoint in this shell: the release's endpoint, not AWS.
    access = bucket.bucket_access(root, _template(s3_server.endpoint))
    assert access.problem == "" and access.settings == {"MYSPROJ_S3_ENDPOINT": s3_server.endpoint,
                                                         "AWS_DEFAULT_REGION": "us-east-1"}
    assert "MYSPROJ_S3_ENDPOINT" not in os.environ  # the diagnosis changes nothing in this process
    with bucket.using(access.settings):
        assert os.environ["MYSPROJ_S3_ENDPOINT"] == s3_server.endpoint
    assert "MYSPROJ_S3_ENDPOINT" not in os.environ and "AWS_DEFAULT_REGION" not in os.environ

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert bucket.bucket_access(root, _template(s3_server.endpoint)).problem == \
        f"{s3_server.endpoint} refused this shell's S3 credentials (access denied)"

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert bucket.bucket_access(root, _template(s3_server.endpoint)).problem == (
        "no S3 credentials in this shell: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the run's pods read them "
        "from Secret mysproj-s3)")

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("MYSPROJ_S3_ENDPOINT", closed)  # this shell's choice wins over the release's
    why = bucket.bucket_access(root, _template(s3_server.endpoint)).problem
    assert why.startswith(f"{closed} is not reachable from here (") and "MYSPROJ_S3_ENDPOINT" in why, why


def test_a_watch_checks_each_complete_output_once(tmp_path, monkeypatch):
    """`mysproj status --watch` and `mysproj reproduce` poll for hours; a finished stage's output is complete for
    good, so its inputs are digested once (prep's: the whole raw dataset listing), not on every poll."""
    ctl, cluster = make_controller(tmp_path)
    for node in READY:
        complete_output(ctl, node, {"time": {"wall_s": 3.0, "throughput": 7.0, "unit": "images/s"}})
    ctl.step()
    complete_output(ctl, FT, {"time": {"wall_s": 12.0, "throughput": 4.5, "unit": "samples/s"}})
    cluster.finish(cluster.stage_jobs()[FT])
    checked: list[str] = []
    existing = StageOutput.existing

    def counted(self):
        checked.append(self.uri)
        return existing(self)

    monkeypatch.setattr(StageOutput, "existing", counted)
    polls: list[list[str]] = []

    def next_poll(_seconds):  # the run moves on between two polls: its controller ends
        polls.append(list(checked))
        cluster.jobs["r1-controller"]["status"] = {"succeeded": 1,
                                                   "conditions": [{"type": "Complete", "status": "True"}]}

    monkeypatch.setattr(watch.time, "sleep", next_poll)
    state, rows = watch.wait(cluster, "r1", timeout=60, interval=10, out=lambda s: None)
    assert state == "complete" and len(polls) == 1
    done = {ctl.configs[n].out.rstrip("/") for n in (*READY, FT)}
    assert done <= set(polls[0])
    assert not done & set(checked[len(polls[0]):])  # the next poll reads none of them again
    row = {r.node: r for r in rows}[FT]
    assert (row.state, row.duration, row.throughput) == ("complete", "0m12s", "4.5 samples/s")
    assert {r.node: r for r in rows}["textures-mini/prep"].throughput == "7 images/s"
