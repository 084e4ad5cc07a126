"""Kubernetes Events on the controller Job (against the in-memory API of fake_cluster; tests/kube/test_cluster.py
runs the same recorder against a real API server): each stage started, done, skipped, retried and failed."""

from __future__ import annotations

import logging

from fake_cluster import complete_output, make_controller

from mysproj import process
from mysproj.kube import controller as C


def _reasons(cluster, reason):
    return [m for r, m in cluster.told() if r == reason]


def test_the_controller_job_tells_the_story_of_a_run(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    ctl.step()
    started = _reasons(cluster, "StageStarted")
    assert sorted(m.split(":")[0] for m in started) == [
        "stage models/clip-tiny started", "stage models/tiny started", "stage textures-mini/prep started"]
    event = next(iter(cluster.events.values()))
    assert event["involvedObject"] == {"apiVersion": "batch/v1", "kind": "Job", "name": "r1-controller",
                                       "namespace": "ns", "uid": "uid-ctl"}
    assert event["type"] == "Normal" and event["metadata"]["labels"] == {"mysproj.io/run": "r1"}

    jobs = cluster.stage_jobs()
    complete_output(ctl, "textures-mini/prep", {"time": {"wall_s": 83.2, "throughput": 12.34, "unit": "images/s"}})
    cluster.finish(jobs["textures-mini/prep"])
    cluster.finish(jobs["models/tiny"], exit_code=137)  # a killed attempt the Job retries
    ctl.step()
    assert _reasons(cluster, "StageDone") == ["stage textures-mini/prep done in 1m23s (12.3 images/s)"]
    retried = _reasons(cluster, "StageRetried")
    assert len(retried) == 1 and "models/tiny" in retried[0] and "exit 137" in retried[0]
    cluster.finish(jobs["models/clip-tiny"], exit_code=137)
    cluster.finish(jobs["models/clip-tiny"])  # retried and done between two passes
    cluster.jobs[jobs["models/clip-tiny"]]["status"]["failed"] = 1
    ctl.step()
    assert any("models/clip-tiny: 1 failed attempt(s)" in m for m in _reasons(cluster, "StageRetried"))
    assert any(m.startswith("stage models/clip-tiny done") for m in _reasons(cluster, "StageDone"))
    ctl.step()  # nothing new happened: nothing told twice
    assert len(_reasons(cluster, "StageDone")) == 2 and len(_reasons(cluster, "StageRetried")) == 2

    cluster.jobs[jobs["models/tiny"]]["status"]["conditions"] = [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]
    assert process.run("controller", lambda: C.main(ctl.cfg, cluster)) == 64  # as jobs/controller.py runs it
    failed = [e for e in cluster.events.values() if e["reason"] == "StageFailed"]
    assert len(failed) == 1 and failed[0]["type"] == "Warning"
    assert failed[0]["message"].startswith("stage models/tiny failed: Job has reached the specified backoff limit")
    assert _reasons(cluster, "RunFailed") == [
        "run r1 failed: stage models/tiny: Job has reached the specified backoff limit: boom"]


def test_skipped_stages_and_a_restarted_controller_tell_nothing_twice(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    complete_output(ctl, "textures-mini/prep")
    ctl.step()
    assert _reasons(cluster, "StageSkipped") == [
        "stage textures-mini/prep skipped: its output is complete already with this config"]
    told = cluster.told()
    restarted, _ = make_controller(tmp_path, cluster)  # a new process: it tells the same story, the API has it
    restarted.step()
    assert cluster.told() == told


def test_events_that_cannot_be_written_cost_one_warning_and_nothing_else(tmp_path, caplog):
    ctl, cluster = make_controller(tmp_path)

    def forbidden(body):
        raise PermissionError("events is forbidden: User cannot create resource events")

    cluster.create_event = forbidden
    with caplog.at_level(logging.WARNING, logger="mysproj.kube.events"):
        first = ctl.step()
        for name in list(cluster.stage_jobs().values()):
            cluster.finish(name)
        ctl.step()
    assert len(first.created) == 3 and len(cluster.stage_jobs()) > 3  # the run went on
    warnings = [r for r in caplog.records if r.name == "mysproj.kube.events"]
    assert len(warnings) == 1 and "r1-controller" in warnings[0].getMessage()


def test_no_controller_job_no_events(tmp_path):
    ctl, cluster = make_controller(tmp_path, controller_job="")
    ctl.step()
    assert cluster.events == {}
