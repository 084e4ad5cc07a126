"""What only a real node shows: a stage Job built from the chart's own template (the one the controller fills in)
runs with the chart's user, read-only root, dropped capabilities, seccomp profile and memory limit, read back from
inside the running pod; its output reaches `kubectl logs` through the API server; deleting it sends SIGTERM and
leaves the process the chart's `terminationGracePeriodSeconds` before the kill."""

from __future__ import annotations

import copy
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mysproj"
GRACE = 3  # seconds: a short grace period for this test's release

PROBE = r"""
import os, pathlib, signal, sys, time
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print("ids", os.getuid(), os.getgid(), sorted(os.getgroups()))
print("caps", status["CapEff"].strip(), status["CapBnd"].strip(), "nnp", status["NoNewPrivs"].strip(),
      "seccomp", status["Seccomp"].strip())
print("memory limit", open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip())
for path in ("/app/probe", os.environ["MYSPROJ_SCRATCH"] + "/probe"):
    try:
        pathlib.Path(path).write_text("x")
        print("writable", path)
    except OSError as e:
        print("refused", path, e.strerror)
def on_term(*_):
    print("SIGTERM: checkpointing", flush=True)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:  # never exits on its own: only the kill after the grace period ends it
    time.sleep(0.2)
    print("tick", flush=True)
"""


def chart_template(kube, kind: str, *sets: str) -> tuple[dict, dict]:
    """The chart's stage Job template of `kind` as rendered for a release, and the values it was rendered with."""
    rendered = subprocess.run(
        ["helm", "template", "probe", str(CHART), "-f", str(CHART / "values-tiny.yaml"), "--namespace",
         kube.namespace, *kube.image_values, "--set", f"storage.endpoint={kube.s3_endpoint}",
         *[a for s in sets for a in ("--set", s)]], env=kube.env, capture_output=True, text=True, check=True).stdout
    configmap = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ConfigMap")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    tiny = yaml.safe_load((CHART / "values-tiny.yaml").read_text())
    for key in ("finetune", "gpu", "cpu"):
        values[key] = {**values[key], **tiny.get(key, {})}
    return yaml.safe_load(configmap["data"][f"job-{kind}.yaml"]), values


def quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def test_a_stage_pod_runs_as_the_chart_says_and_gets_its_grace_period(kube):
    template, values = chart_template(kube, "finetune", f"finetune.terminationGracePeriodSeconds={GRACE}",
                                      "storage.credentialsSecret=")  # the probe reads no bucket
    job = copy.deepcopy(template)
    job["metadata"]["name"] = "probe-finetune"
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    container["command"] = ["python", "-u", "-c", textwrap.dedent(PROBE)]
    container.pop("args", None)
    assert pod_spec["terminationGracePeriodSeconds"] == GRACE
    kube.batch.create_namespaced_job(kube.namespace, job)

    def ready_pod():
        pods = [p.metadata.name for p in kube.pods("job-name=probe-finetune")]
        return next((p for p in pods if "ready" in kube.pod_log(p)), None)

    pod = kube.wait_for(ready_pod, 120, "the probe pod to start")
    out = kube.pod_log(pod)
    pod_sc = values["podSecurityContext"]
    uid, gid, fs_group = pod_sc["runAsUser"], pod_sc["runAsGroup"], pod_sc["fsGroup"]
    assert f"ids {uid} {gid} {sorted({gid, fs_group})}" in out, out
    # No capability left, none to gain (no_new_privs), the runtime's default seccomp filter (mode 2).
    assert "caps 0000000000000000 0000000000000000 nnp 1 seccomp 2" in out, out
    limit = quantity(values["finetune"]["resources"]["limits"]["memory"])
    assert f"memory limit {limit}" in out, out
    assert "refused /app/probe Read-only file system" in out, out
    assert f"writable {values['stages']['scratchDir']}/probe" in out, out

    # `kubectl logs -f` through the API server while the pod is deleted: SIGTERM, the pod keeps running through
    # its grace period, then the kubelet kills it.
    kube.wait_for(lambda: kube.pod_log(pod).count("tick") >= 2, 30, "the probe to tick")
    try:
        streamed, exit_code, _ = kube.delete_following(pod, GRACE + 60)
    finally:
        # The Job would replace the deleted pod with another that never ends.
        kube.batch.delete_namespaced_job("probe-finetune", kube.namespace, propagation_policy="Background")
    assert streamed.startswith("ids "), streamed[:500]
    after = streamed.split("SIGTERM: checkpointing\n", 1)
    assert len(after) == 2, streamed[-2000:]
    assert after[1].count("tick") >= 2, streamed[-2000:]  # it ran on after SIGTERM, within its grace period
    assert exit_code == 137, exit_code  # then SIGKILL: it never exited on its own
