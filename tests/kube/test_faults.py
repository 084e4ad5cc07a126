"""Fault injection on the real control plane and the real S3 server, plus `make reproduce`, the
path the reproduce workflow takes.

- `make reproduce` installs release A (undisturbed) while release B of the same dataset runs in the same namespace
  with faults: B's pipeline controller is killed (its Job restarts it), and the process of every stage kind is
  killed once at a random moment. Both complete, neither sees the other's Jobs, and B's outputs equal A's: the same
  stage outputs, bit-identical weights (fine-tuning resumed) and the same metrics.
- Wrong S3 credentials: the run fails fast with the reason, nothing is written as complete.
- Invalid values: `mysproj reproduce` (through helm's schema check) refuses them with one line before anything exists.

Every case is bounded (pytest-timeout, deadlines on each wait) and reuses the session's cluster and S3 server.
Cases that need no cluster are in tests/test_faults_local.py; a preempted fine-tuning stage, a deleted pod and a
bad-input stage are in tests/kube/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import releases
from releases import controller_events, helm

from mysproj.kube.jobspec import ANN_FAILURE

pytestmark = [pytest.mark.kube, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mysproj"
VALUES = CHART / "values-tiny.yaml"
BUCKET = "mysproj-faults"
RUN_TIMEOUT = 600
# A smaller run than the e2e test's: no probes (9 stage Jobs: prep, 2 model-init, finetune, merge, eval-clip,
# 2 eval-llava, report); fine-tuning, merge and every Table 1 row stay in.
SETS = ["pipeline.probe=false"]
STAGE_KINDS = ("prep", "model-init", "finetune", "merge", "eval-clip", "eval-llava", "report")
KILL_WITHIN = 0.5  # seconds after a stage's process starts: each is killed at a random moment in this window


@pytest.fixture(scope="module")
def run_env(kube, s3_server):
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.start()  # an earlier test stopped it
    s3_server.create_bucket(BUCKET)
    kube.core.create_namespaced_secret(kube.namespace, {
        "metadata": {"name": "mysproj-s3"}, "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    env = {**kube.env, **s3_server.env(), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    env.pop("MYSPROJ_S3_ENDPOINT", None)
    sets = [f"storage.endpoint={kube.s3_endpoint}", f"storage.bucket={BUCKET}", *SETS, *kube.image_sets]
    return kube, s3_server, env, sets


def mysproj(env, *args):
    return releases.mysproj(env, *args, timeout=RUN_TIMEOUT)


def controller_state(kube, release):
    job = kube.controller_job(release)
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type, job
    return None, job


def jobs_of(kube, release, stage=None):
    sel = f"mysproj.io/run={release}" + (f",mysproj.io/stage={stage}" if stage else "")
    return kube.batch.list_namespaced_job(kube.namespace, label_selector=sel).items


def running_pod(kube, release, stage):
    for p in kube.pods(f"mysproj.io/run={release},mysproj.io/stage={stage}"):
        if p.status.phase == "Running" and kube.is_running(p.metadata.name):
            return p.metadata.name
    return None


def debug(kube, release) -> str:
    pods = kube.pods(f"mysproj.io/run={release}")
    ctl = [p for p in pods if p.metadata.labels.get("mysproj.io/stage") == "controller"]
    return "\n".join(f"{p.metadata.name}: {p.status.phase}" for p in pods) + "\n" + "".join(
        kube.pod_log(p.metadata.name)[-3000:] for p in ctl)


def outputs(fs, root: str) -> dict[str, dict]:
    """Every complete stage output under a run root: relative folder -> its manifest."""
    found = {}
    for path in fs.find(root):
        if path.endswith("/_SUCCESS.json") and "/checkpoints/" not in path:
            found[path[len(root) + 1: -len("/_SUCCESS.json")]] = json.loads(fs.cat_file(path))
    return found


def results(path_or_bytes) -> dict[tuple, dict]:
    import io

    import pyarrow.parquet as pq

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    metrics = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "unparsed", "n")
    return {(r["dataset"], r["setting"], r["seed"], r["stage"], r["block"]): {k: r[k] for k in metrics}
            for r in pq.read_table(src).to_pylist()}


@pytest.mark.timeout(RUN_TIMEOUT + 180)
def test_make_reproduce_beside_a_twin_release_with_faults(run_env, tmp_path):
    kube, s3, env, sets = run_env
    out = tmp_path / "report-a"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "reproduce", "DATASET=textures-mini", f"VALUES={VALUES}",
         f"NAMESPACE={kube.namespace}", "RELEASE=repro-a", f"OUT={out}", f"TIMEOUT={RUN_TIMEOUT}", "INTERVAL=2",
         f"SET={' '.join(sets)}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        helm(env, "install", "twin-b", str(CHART), "-f", str(VALUES), "--namespace", kube.namespace,
             *[a for s in sets for a in ("--set", s)])
        rng = random.Random(7)
        victims: dict[str, float | None] = dict.fromkeys(STAGE_KINDS)  # stage -> kill time once its process runs
        killed: dict[str, str] = {}

        # Kill B's controller once it has created its first stage Jobs; its Job starts a new one, which must pick
        # up where it was. Meanwhile kill each victim stage's process at a random moment after it starts.
        def inject():
            now = time.monotonic()
            if "controller" not in killed and len(jobs_of(kube, "twin-b")) > 1:
                pod = running_pod(kube, "twin-b", "controller")
                if pod:
                    kube.kill(pod)
                    killed["controller"] = pod
            for stage, when in victims.items():
                if stage in killed:
                    continue
                pod = running_pod(kube, "twin-b", stage)
                if pod and when is None:
                    victims[stage] = now + rng.uniform(0.0, KILL_WITHIN)
                elif pod and now >= when:
                    kube.kill(pod)
                    killed[stage] = pod
            return len(killed) == len(victims) + 1 or controller_state(kube, "twin-b")[0]

        kube.wait_for(inject, RUN_TIMEOUT, "the faults to be injected into twin-b", interval=0.1)
        assert set(killed) == {"controller", *victims}, f"not every fault happened: {killed}"
        state = kube.wait_for(lambda: controller_state(kube, "twin-b")[0], RUN_TIMEOUT, "twin-b to finish")
        assert state == "Complete", debug(kube, "twin-b")
        log, _ = make.communicate(timeout=RUN_TIMEOUT)
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()

    (tmp_path / "make-reproduce.log").write_text(log or "")  # kept with pytest's temp dirs for inspection
    # A: `make reproduce` printed Table 1 and the comparison, saved the report, and (random weights) did not
    # enforce it; then it uninstalled its release.
    assert make.returncode == 0, log[-5000:]
    assert "Table 1" in log and "LLaVA-1.5 FT-Proj" in log and "not enforced" in log, log[-3000:]
    assert {"report.md", "results.parquet", "comparison.json"} <= {p.name for p in out.iterdir()}
    assert any(out.glob("plots/*"))
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["random_weights"] is True and comparison["enforced"] is False
    assert {c["row"] for c in comparison["checks"]} == {"CLIP zero-shot", "LLaVA-1.5 zero-shot", "LLaVA-1.5 FT-Proj"}
    assert "release repro-a uninstalled" in log  # the garbage collector removes its Jobs (tested in the e2e test)
    assert helm(env, "status", "repro-a", "--namespace", kube.namespace, check=False).returncode != 0

    # B: the restarted controller created no stage Job twice; every stage Job belongs to B's controller.
    _, ctl = controller_state(kube, "twin-b")
    assert ctl.status.failed >= 1 and ctl.status.succeeded == 1  # the killed controller, then the one that finished
    stage_jobs = [j for j in jobs_of(kube, "twin-b") if j.metadata.labels["mysproj.io/stage"] != "controller"]
    assert len(stage_jobs) == 9 == len({j.metadata.name for j in stage_jobs})
    assert all(j.metadata.owner_references[0].uid == ctl.metadata.uid for j in stage_jobs)
    assert all(j.status.succeeded == 1 for j in stage_jobs)
    for stage in victims:  # the killed attempt, then the retry
        assert any((j.status.failed or 0) >= 1 for j in stage_jobs if j.metadata.labels["mysproj.io/stage"] == stage)
    # ... and each retry is told on the controller Job (`kubectl describe job twin-b-mysproj-controller`).
    retried = " ".join(m for r, m in controller_events(kube, "twin-b") if r == "StageRetried")
    for stage, pod in killed.items():
        if stage != "controller":
            assert f"Job {pod.rsplit('-', 1)[0]} retried it" in retried, (stage, retried)

    # Same artifacts: the same stage outputs, the same weights and the same metrics as the undisturbed run.
    fs = s3.filesystem()
    a, b = outputs(fs, f"{BUCKET}/runs/repro-a"), outputs(fs, f"{BUCKET}/runs/twin-b")
    assert set(a) == set(b) and len(a) == 9, sorted(set(a) ^ set(b))
    for rel in a:
        weights_a = {n: e["sha256"] for n, e in a[rel]["files"].items() if n.endswith(".safetensors")}
        weights_b = {n: e["sha256"] for n, e in b[rel]["files"].items() if n.endswith(".safetensors")}
        assert weights_a == weights_b, f"{rel}: weights differ after the faults"
        assert a[rel]["stage"] == b[rel]["stage"]
    assert any(n.endswith(".safetensors") for n in b["textures-mini/ft-projector/seed0/merge"]["files"])
    theirs = results(fs.cat_file(f"{BUCKET}/runs/twin-b/report/results.parquet"))
    assert results(out / "results.parquet") == theirs and len(theirs) == 3

    status = mysproj(env, "status", "twin-b", "--namespace", kube.namespace)
    assert status.returncode == 0 and "repro-a" not in status.stdout, status.stdout
    helm(env, "uninstall", "twin-b", "--namespace", kube.namespace)


@pytest.mark.timeout(240)
def test_wrong_s3_credentials_fail_the_run_fast_with_the_reason(run_env):
    kube, s3, env, sets = run_env
    kube.core.create_namespaced_secret(kube.namespace, {
        "metadata": {"name": "wrong-s3"}, "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}})
    helm(env, "install", "badcreds", str(CHART), "-f", str(VALUES), "--namespace", kube.namespace,
         *[a for s in sets for a in ("--set", s)], "--set", "storage.credentialsSecret=wrong-s3")
    state = kube.wait_for(lambda: controller_state(kube, "badcreds")[0], 180, "the run to fail")
    assert state == "Failed", debug(kube, "badcreds")
    _, ctl = controller_state(kube, "badcreds")
    reason = (ctl.metadata.annotations or {}).get("mysproj.io/failure", "")
    assert "access denied" in reason and "AWS_SECRET_ACCESS_KEY" in reason, reason
    assert (ctl.status.failed or 0) <= 1  # failed fast: not retried (bad input, exit 64)
    fs = s3.filesystem()
    assert not [p for p in fs.find(f"{BUCKET}/runs/badcreds") if p.endswith("_SUCCESS.json")]
    status = mysproj(env, "status", "badcreds", "--namespace", kube.namespace)
    assert status.returncode == 1 and "access denied" in status.stdout, status.stdout
    helm(env, "uninstall", "badcreds", "--namespace", kube.namespace)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad, message", [
    ("stages.backoffLimit=lots", "backoffLimit"),
    ("pipeline.seedz=1", "seedz"),
])
def test_invalid_values_are_refused_before_anything_exists(run_env, tmp_path, bad, message):
    kube, s3, env, sets = run_env
    release = "badvalues"
    result = mysproj(env, "reproduce", "--dataset", "textures-mini", "--values", str(VALUES), "--namespace",
                     kube.namespace, "--release", release, "--out", str(tmp_path / "o"),
                     *[a for s in [*sets, bad] for a in ("--set", s)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 64, result.stdout + result.stderr
    assert len(errors) == 1 and message in errors[0] and "helm install badvalues failed" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert helm(env, "status", release, "--namespace", kube.namespace, check=False).returncode != 0
    assert not jobs_of(kube, release)
    assert not kube.core.list_namespaced_config_map(kube.namespace, label_selector=f"mysproj.io/run={release}").items
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(240)
def test_values_the_schema_accepts_but_a_stage_config_refuses_fail_the_controller_at_once(run_env):
    """A dataset without a source is refused by `helm install` itself. A stage override out of its range
    (max_steps 0) passes the chart's schema but not the stage config: the controller exits 64 with the reason and
    ends its own Job (1.20 servers have no podFailurePolicy to stop the retries)."""
    kube, s3, env, sets = run_env
    refused = helm(env, "install", "nosource", str(CHART), "-f", str(VALUES), "--namespace", kube.namespace,
                   *[a for s in sets for a in ("--set", s)], "--set-json", 'pipeline.datasets=["imagefolder"]',
                   check=False)
    assert refused.returncode != 0 and "pipeline.sources has no entry for dataset 'imagefolder'" in refused.stderr
    assert helm(env, "status", "nosource", "--namespace", kube.namespace, check=False).returncode != 0
    assert not jobs_of(kube, "nosource")
    helm(env, "install", "badstep", str(CHART), "-f", str(VALUES), "--namespace", kube.namespace,
         *[a for s in sets for a in ("--set", s)], "--set", "pipeline.overrides.finetune.max_steps=0")
    state = kube.wait_for(lambda: controller_state(kube, "badstep")[0], 180, "the controller to fail")
    _, ctl = controller_state(kube, "badstep")
    # Without end_job the Job would need 7 failed pods (backoffLimit 6, exponential backoff: many minutes). The Job
    # controller may already have started the replacement pod when it processes the deadline, so one more may count.
    assert state == "Failed" and (ctl.status.failed or 0) <= 2, debug(kube, "badstep")
    assert "bad input" in (ctl.metadata.annotations or {}).get(ANN_FAILURE, ""), debug(kube, "badstep")
    reason = (ctl.metadata.annotations or {}).get("mysproj.io/failure", "")
    assert "'max_steps' = 0: must be >= 1" in reason, reason
    assert [j.metadata.labels["mysproj.io/stage"] for j in jobs_of(kube, "badstep")] == ["controller"]
    helm(env, "uninstall", "badstep", "--namespace", kube.namespace)
