"""A stage pod whose image cannot be had: a kubelet keeps it Waiting forever (the Job never fails by itself), so
`jobspec.classify` (the one function the controller and `mysproj status` call) fails the stage with that reason."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from mysproj.kube import jobspec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
JOB = {"metadata": {"name": "r1-prep-abc"}, "status": {"active": 1, "startTime": "2026-12-01T11:59:00Z"}}


def _pod(reason: str, message: str, age_s: float) -> dict:
    created = (NOW - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": "r1-prep-abc-x1y2z", "creationTimestamp": created}, "status": {
        "phase": "Pending", "containerStatuses": [{"name": "stage", "image": "reg/mysproj-cpu:1", "state": {
            "waiting": {"reason": reason, "message": message}}}]}}


def test_an_image_the_node_may_not_pull_fails_the_stage_at_once():
    pod = _pod("ErrImageNeverPull", 'Container image "reg/mysproj-cpu:1" is not present with pull policy of Never', 5)
    st = jobspec.classify(JOB, [pod], now=NOW)
    assert (st.state, st.final) == ("failed", True)
    assert st.reason == ('image reg/mysproj-cpu:1: ErrImageNeverPull: Container image "reg/mysproj-cpu:1" is not '
                         "present with pull policy of Never")


def test_a_failing_pull_is_shown_then_final_after_the_grace_period():
    young = jobspec.classify(JOB, [_pod("ImagePullBackOff", 'Back-off pulling image "reg/mysproj-cpu:1"', 30)],
                             now=NOW)
    assert (young.state, young.final) == ("running", False)
    assert young.reason == 'waiting: ImagePullBackOff: Back-off pulling image "reg/mysproj-cpu:1"'
    old = jobspec.classify(JOB, [_pod("ErrImagePull", "manifest unknown", jobspec.IMAGE_PULL_GRACE_SECONDS + 1)],
                           now=NOW)
    assert (old.state, old.final) == ("failed", True)
    assert old.reason == "image reg/mysproj-cpu:1: ErrImagePull: manifest unknown"


def test_a_starting_container_is_no_problem():
    st = jobspec.classify(JOB, [_pod("ContainerCreating", "", 400)], now=NOW)
    assert (st.state, st.final, st.reason) == ("running", False, "")
