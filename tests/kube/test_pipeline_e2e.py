"""End to end on the real control plane and the real S3 server: `helm install` of values-tiny.yaml runs every stage
of the DAG as a real Job, each pod a real container of the project's images under the chart's securityContext (the
CPU image for the controller, prep and report, the GPU image for the rest, on the CPU here), a deleted pod is replaced
and leaves a trace, a preempted fine-tuning (its pod deleted) checkpoints, exits 143 and resumes in the next pod,
`mysproj status` shows the run (with or without the bucket's credentials in the user's shell), the report lands in
the bucket, the run is one MLflow parent run with a child per stage output on a real tracking server the pods reach,
a re-install reuses every output, a `helm upgrade` with changed values runs the changed stages, and `helm uninstall`
leaves nothing behind. A bad-input stage fails the run with its reason."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import releases
from mlflow_server import mlflow_binary
from releases import controller_events, helm, mysproj

from mysproj.config.registry import stages_where

pytestmark = [pytest.mark.kube, pytest.mark.s3]

BUCKET = "mysproj-e2e"
RUN_TIMEOUT = 600
STEPS = 6  # the fine-tuning's optimizer steps in this run (its epoch has 8 at a global batch of 2, the upgrade runs 7)


@pytest.fixture(scope="module")
def run_env(kube, s3_server):
    """The namespace with the credentials Secret, and the environment for helm / `mysproj` on the user's side."""
    s3_server.create_bucket(BUCKET)
    kube.core.create_namespaced_secret(kube.namespace, {
        "metadata": {"name": "mysproj-s3"}, "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    env = {**kube.env, **s3_server.env(), "MYSPROJ_S3_ENDPOINT": s3_server.endpoint}
    return kube, s3_server, env


def install(kube, env, release, *sets, verb="install"):
    return releases.install(kube, env, release, *sets, bucket=BUCKET, verb=verb)


@pytest.fixture(scope="module")
def mlflow_uri(kube, pod_mlflow):
    """The tests' MLflow server (SQLite store, artifacts proxied by the server: the pods share no filesystem with
    it) as the pods reach it; the tests read it at `pod_mlflow.uri`."""
    if not mlflow_binary():
        pytest.fail("no `mlflow` server binary: run `make mlflow-server`")
    pod_mlflow.start()
    return pod_mlflow.uri.replace("127.0.0.1", kube.origin_host)


def mlflow_runs(uri: str, root: str):
    """(the MlflowClient, the parent runs of run root `root`, {run path: child run} of the first) on the server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mysproj")
    assert experiment is not None, "no MLflow experiment `mysproj`"
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`mysproj.kind` = 'parent' and tags.`mysproj.root` = '{root}'")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'") if parents else []
    by_path: dict = {}
    for child in children:
        by_path.setdefault(child.data.tags["mysproj.run_path"], []).append(child)
    assert all(len(runs) == 1 for runs in by_path.values()), {p: len(r) for p, r in by_path.items()}
    return client, parents, {p: runs[0] for p, runs in by_path.items()}


def image_revision(image: str) -> str:
    """The git revision a test image was built from (its OCI label, which tests/test_container_images.py checks)."""
    return subprocess.run(["podman", "image", "inspect", "--format",
                           '{{index .Labels "org.opencontainers.image.revision"}}', image],
                          capture_output=True, text=True, check=True).stdout.strip()


def finished(kube, release, revision=1):
    job = kube.controller_job(release)
    if job is None or int(job.metadata.labels["mysproj.io/revision"]) < revision:
        return None
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None


def debug(kube, release) -> str:
    """What to look at when a run does not finish: the controller's output and every Job's state."""
    pods = kube.pods(f"mysproj.io/run={release}")
    lines = [f"{p.metadata.name}: {p.status.phase}" for p in pods]
    ctl = [p for p in pods if p.metadata.labels.get("mysproj.io/stage") == "controller"]
    return "\n".join(lines) + "\n" + "".join(kube.pod_log(p.metadata.name)[-4000:] for p in ctl)


def leftovers(kube, release):
    sel = f"app.kubernetes.io/instance={release}"
    return ([j.metadata.name for j in kube.batch.list_namespaced_job(kube.namespace, label_selector=sel).items]
            + [p.metadata.name for p in kube.core.list_namespaced_pod(kube.namespace, label_selector=sel).items]
            + [c.metadata.name for c in kube.core.list_namespaced_config_map(kube.namespace, label_selector=sel).items])


SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def signal_mask(pid: int, field: str) -> int:
    """A signal mask of a process on this machine (/proc/<pid>/status: SigCgt caught, ShdPnd pending)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status[field], 16)


def frozen_handling_sigterm(pid: int) -> bool:
    """Freeze the process and say whether it handles SIGTERM; thaw it again where it does not. Read while it is
    stopped, the answer cannot be outdated by the time a SIGTERM comes (a handler seen while it runs can be gone by
    then, and the kernel drops a SIGTERM to a container's init that has none)."""
    os.kill(pid, signal.SIGSTOP)
    while "T (stopped)" not in Path(f"/proc/{pid}/status").read_text():
        time.sleep(0.001)
    if signal_mask(pid, "SigCgt") & SIGTERM_BIT:
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def without_bucket_access(env):
    """The user's shell without any S3 credentials or endpoint."""
    keep = {k: v for k, v in env.items() if not k.startswith("AWS_") and k != "MYSPROJ_S3_ENDPOINT"}
    return {**keep, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}



def test_tiny_run_completes_survives_a_kill_resumes_and_uninstalls_cleanly(run_env, mlflow_uri, pod_mlflow,
                                                                           tmp_path):
    kube, s3, env = run_env
    # More optimizer steps than values-tiny.yaml's 2 (16 training images, 4 a step): the fine-tuning pod is preempted
    # between two of them.
    tracked = ("--set", f"pipeline.tracking.mlflow_uri={mlflow_uri}", "--set",
               f"pipeline.overrides.finetune.max_steps={STEPS}", "--set", "pipeline.overrides.finetune.global_batch=2")
    notes = install(kube, env, "tiny", *tracked).stdout
    assert "mysproj status tiny" in notes and "kubectl get jobs" in notes
    assert f"mysproj logs tiny textures-mini/prep --namespace {kube.namespace}" in notes

    # A pod deleted while it runs (a drain, an eviction) is replaced by its Job; `mysproj status` keeps a trace.
    # Its work takes a second: the process is frozen (SIGSTOP) once it handles SIGTERM, so the deletion cannot
    # come after it finished, and thawed once the kubelet's SIGTERM waits for it. It then stops (exit 143).
    def model_init_pod_running():
        pods = [p.metadata.name for p in kube.pods("mysproj.io/stage=model-init")
                if p.metadata.annotations["mysproj.io/node"] == "models/tiny"]
        return next(((p, pid) for p in pods if (pid := kube.container_pid(p))), None)

    deleted, pid = kube.wait_for(model_init_pod_running, RUN_TIMEOUT, "the models/tiny pod to run", interval=0.05)
    kube.wait_for(lambda: frozen_handling_sigterm(pid), 60, "models/tiny's process to handle SIGTERM", interval=0.01)
    kube.core.delete_namespaced_pod(deleted, kube.namespace)
    kube.wait_for(lambda: signal_mask(pid, "ShdPnd") & SIGTERM_BIT, 60, "the kubelet's SIGTERM to models/tiny")
    os.kill(pid, signal.SIGCONT)

    # Preemption: the fine-tuning pod is deleted (as a drain or a spot reclaim does) once it has written its first
    # checkpoint. SIGTERM: it finishes the step in flight, writes a checkpoint and exits 143; the Job's next pod
    # resumes from that checkpoint.
    def finetune_pod_checkpointed():
        pods = [p.metadata.name for p in kube.pods("mysproj.io/stage=finetune") if kube.is_running(p.metadata.name)]
        return next((p for p in pods if "finetune: checkpoint step 1 " in kube.pod_log(p)), None)

    victim = kube.wait_for(finetune_pod_checkpointed, RUN_TIMEOUT, "the finetune pod's first checkpoint",
                           interval=0.1)
    streamed, exit_code, tail = kube.delete_following(victim, RUN_TIMEOUT)
    assert "finetune: SIGTERM received; stopping after the current optimizer step with a checkpoint" in streamed + tail
    stopped = re.search(rf"^stopped: SIGTERM: fine-tuning stopped after optimizer step (\d+) of {STEPS}, checkpoint "
                        r"step \1 written", streamed + tail, re.MULTILINE)
    # The exit code as the kubelet reported it. Kubelet v1.20 can remove a deleted pod before it reports the final
    # status (1.22 made that report come first); then the `stopped:` line says it: the process prints it exactly when
    # it exits 143 (mysproj.process, tests/test_process.py).
    assert stopped and exit_code in (143, None), (exit_code, streamed[-2000:], tail)
    assert kube.wait_for(lambda: finished(kube, "tiny"), RUN_TIMEOUT, "the run to finish") == "Complete", \
        debug(kube, "tiny")

    jobs = kube.batch.list_namespaced_job(kube.namespace, label_selector="mysproj.io/run=tiny").items
    stages = {j.metadata.labels["mysproj.io/stage"] for j in jobs}
    assert stages == {"controller", "model-init", "prep", "finetune", "merge", "eval-clip", "eval-llava", "probe",
                      "report"}
    assert len(jobs) == 12  # the controller and the 11 stages of values-tiny.yaml
    ft = next(j for j in jobs if j.metadata.labels["mysproj.io/stage"] == "finetune")
    assert ft.status.succeeded == 1
    resumed_by = [p.metadata.name for p in kube.pods(f"job-name={ft.metadata.name}") if p.metadata.name != victim]
    assert len(resumed_by) == 1, resumed_by
    assert f"finetune: resumed from checkpoint step {stopped[1]} of {STEPS}" in kube.pod_log(resumed_by[0])
    # Every pod was a container of the image its kind needs (torch only in the GPU image).
    for pod in kube.pods("mysproj.io/run=tiny"):
        kind = "cpu" if pod.metadata.labels["mysproj.io/stage"] in ("controller", "prep", "report") else "gpu"
        assert [c.image for c in pod.spec.containers] == [kube.images[kind]], pod.metadata.name
    owner = kube.controller_job("tiny").metadata.uid
    assert all(j.metadata.owner_references[0].uid == owner for j in jobs
               if j.metadata.labels["mysproj.io/stage"] != "controller")

    # The user's shell has the credentials but not the endpoint: the release's endpoint is used, never AWS.
    status = mysproj({k: v for k, v in env.items() if k not in ("MYSPROJ_S3_ENDPOINT", "AWS_ENDPOINT_URL")},
                     "status", "tiny", "--namespace", kube.namespace)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[1:] if line.strip() and "/" in line.split()[0]
            or line.startswith(("report", "controller"))]
    assert len(rows) == 12 and all(r[2] == "complete" for r in rows), status.stdout
    assert {r[1] for r in rows} == {j.metadata.name for j in jobs}  # the same Jobs `kubectl get jobs` lists
    for node, pod in (("models/tiny ", deleted), ("textures-mini/ft-projector/seed0/finetune ", victim)):
        row = next(line for line in status.stdout.splitlines() if line.startswith(node))
        assert f"1 pod(s) replaced (last: pod {pod} " in row, status.stdout
    # Without credentials: one line says what is missing; the cluster's view is still shown.
    blind = mysproj(without_bucket_access(env), "status", "tiny", "--namespace", kube.namespace)
    assert blind.returncode == 0 and "Traceback" not in blind.stderr, blind.stdout + blind.stderr
    assert blind.stdout.splitlines()[0] == (
        f"bucket s3://{BUCKET}/runs/tiny not read: no S3 credentials in this shell: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (the run's pods read them from Secret mysproj-s3); the table shows what the cluster "
        "knows")
    assert blind.stdout.splitlines()[-1] == "12 complete", blind.stdout

    fs = s3.filesystem()
    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/tiny/report/_SUCCESS.json"))
    assert manifest["stage"] == "report" and "report.md" in manifest["files"]
    # the stages' pods record their time as local runs do, and the report shows it
    ft = json.loads(fs.cat_file(f"{BUCKET}/runs/tiny/textures-mini/ft-projector/seed0/finetune/_SUCCESS.json"))
    assert ft["summary"]["time"]["unit"] == "samples/s" and ft["summary"]["time"]["wall_s"] > 0
    report_md = fs.cat_file(f"{BUCKET}/runs/tiny/report/report.md").decode()
    assert "## Training" in report_md and "plots/loss_textures-mini.png" in manifest["files"]
    assert [n for n in ft["files"] if n.startswith("events.out.tfevents.")]  # TensorBoard's, in the manifest
    # The run's story on the controller Job (`kubectl describe job tiny-mysproj-controller`).
    story = controller_events(kube, "tiny")
    nodes = {j.metadata.annotations["mysproj.io/node"] for j in jobs
             if j.metadata.labels["mysproj.io/stage"] != "controller"}
    for reason in ("StageStarted", "StageDone"):
        assert {m.split()[1] for r, m in story if r == reason} == nodes, (reason, story)
    assert [r for r, _ in story].count("RunComplete") == 1, story
    assert "## Time" in report_md and "| `textures-mini/ft-projector/seed0/finetune` | finetune |" in report_md

    # MLflow: one parent run for the release, one child per fine-tuning, evaluation and probe output (the preempted
    # fine-tuning attempt's unfinished child replaced by the resumed one's) with the stage's config as params and its
    # metrics, and the report's files uploaded by the report pod as the parent's artifacts.
    root = f"s3://{BUCKET}/runs/tiny"
    built_from = image_revision(kube.images["gpu"])
    client, parents, children = mlflow_runs(pod_mlflow.uri, root)
    controller_said = [line for pod in kube.pods("mysproj.io/run=tiny,mysproj.io/stage=controller")
                       for line in kube.pod_log(pod.metadata.name).splitlines() if "mlflow" in line]
    assert len(parents) == 1 and parents[0].data.tags.get("mysproj.release") == "tiny", (parents, controller_said)
    parent = parents[0].info.run_id
    tracked_nodes = {j.metadata.annotations["mysproj.io/node"] for j in jobs
                     if j.metadata.labels["mysproj.io/stage"] in stages_where("tracked")}
    assert set(children) == tracked_nodes and len(tracked_nodes) == 6, sorted(children)
    for path, child in children.items():
        done = json.loads(fs.cat_file(f"{BUCKET}/runs/tiny/{path}/_SUCCESS.json"))
        assert child.info.status == "FINISHED" and child.data.tags["mysproj.config_hash"] == done["config_hash"]
        assert done["summary"]["mlflow"] == {"uri": mlflow_uri, "run_id": child.info.run_id, "missed": 0,
                                             "error": None}, path
        assert child.data.params["out"] == f"{root}/{path}" and child.data.metrics, path
        # tagged with the image the pod ran and the git revision that image was built from
        assert child.data.tags["mysproj.image"] == kube.images["gpu"], child.data.tags
        assert child.data.tags["mlflow.source.git.commit"] == built_from, child.data.tags
    ft_child = children["textures-mini/ft-projector/seed0/finetune"]
    assert ft_child.data.params["strategy"] == "projector" and ft_child.data.params["max_steps"] == str(STEPS)
    assert [m.step for m in client.get_metric_history(ft_child.info.run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert "eval/macro_f1" in children["textures-mini/ft-projector/seed0/eval-llava"].data.metrics
    assert "probe/post_macro_f1" in children["textures-mini/zero-shot/seed0/probe"].data.metrics
    assert {"report/report.md", "report/results.parquet"} <= {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/plots/loss_textures-mini.png" in {a.path for a in client.list_artifacts(parent, "report/plots")}
    uploaded = Path(client.download_artifacts(parent, "report/report.md", str(tmp_path))).read_text()
    assert uploaded == report_md

    logs = mysproj(env, "logs", "tiny", "textures-mini/prep", "--namespace", kube.namespace)
    prep = next(j.metadata.name for j in jobs if j.metadata.labels["mysproj.io/stage"] == "prep")
    pod = kube.pods(f"job-name={prep}")[0].metadata.name
    assert logs.returncode == 0 and logs.stdout == f"== {prep} / {pod}\n{kube.pod_log(pod)}", logs.stdout

    helm(env, "uninstall", "tiny", "--namespace", kube.namespace)
    kube.wait_for(lambda: not leftovers(kube, "tiny"), 120, "the garbage collector to remove every object")

    # A re-install of the same values reuses every complete output: only the controller runs.
    install(kube, env, "tiny", *tracked)
    assert kube.wait_for(lambda: finished(kube, "tiny"), 180, "the resumed run") == "Complete", debug(kube, "tiny")
    jobs = kube.batch.list_namespaced_job(kube.namespace, label_selector="mysproj.io/run=tiny").items
    assert [j.metadata.labels["mysproj.io/stage"] for j in jobs] == ["controller"]
    skipped = {m.split()[1] for r, m in controller_events(kube, "tiny") if r == "StageSkipped"}
    assert skipped == nodes
    resumed = mysproj(env, "status", "tiny", "--namespace", kube.namespace).stdout
    assert "11 reused" in resumed, resumed

    # `helm upgrade` with a changed value: the next revision's controller runs the changed stage.
    install(kube, env, "tiny", *tracked, "--set", f"pipeline.overrides.finetune.max_steps={STEPS + 1}",
            verb="upgrade")
    assert kube.wait_for(lambda: finished(kube, "tiny", revision=2), RUN_TIMEOUT, "the upgraded run") == "Complete", \
        debug(kube, "tiny")
    jobs = kube.batch.list_namespaced_job(kube.namespace, label_selector="mysproj.io/run=tiny").items
    assert [j.metadata.name for j in jobs if j.metadata.labels["mysproj.io/stage"] == "controller"] == \
        ["tiny-mysproj-controller-2"]  # Helm removed revision 1's
    ft = [j for j in jobs if j.metadata.labels["mysproj.io/stage"] == "finetune"]
    assert len(ft) == 1 and ft[0].status.succeeded == 1
    ft_env = {e.name: e.value for e in ft[0].spec.template.spec.containers[0].env}
    assert ft_env["MYSPROJ_MAX_STEPS"] == str(STEPS + 1)
    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/tiny/textures-mini/ft-projector/seed0/finetune/_SUCCESS.json"))
    assert manifest["config"]["max_steps"] == STEPS + 1
    upgraded = mysproj(env, "status", "tiny", "--namespace", kube.namespace).stdout
    ft_row = next(ln for ln in upgraded.splitlines() if ln.startswith("textures-mini/ft-projector/seed0/finetune"))
    assert ft_row.split()[1:3] == [ft[0].metadata.name, "complete"], upgraded
    # Still one parent and one child per output in MLflow: each stage that ran again replaced its child.
    client, parents, again = mlflow_runs(pod_mlflow.uri, root)
    assert len(parents) == 1 and parents[0].info.run_id == parent and set(again) == tracked_nodes
    ft_child = again["textures-mini/ft-projector/seed0/finetune"]
    assert ft_child.data.params["max_steps"] == str(STEPS + 1)
    assert ft_child.info.run_id == manifest["summary"]["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(ft_child.info.run_id, "train/loss")] == list(range(1, STEPS + 2))
    helm(env, "uninstall", "tiny", "--namespace", kube.namespace)
    kube.wait_for(lambda: not leftovers(kube, "tiny"), 120, "the garbage collector to remove every object")


def test_bad_input_fails_the_run_with_its_reason(run_env):
    kube, s3, env = run_env
    missing = f"s3://{BUCKET}/no-such-dtd"
    notes = install(kube, env, "bad", "--set", "pipeline.datasets={dtd}", "--set",
                    f"pipeline.sources.dtd={missing}", "--set", "pipeline.zero_shot=false", "--set",
                    "pipeline.probe=false").stdout
    assert f"mysproj logs bad dtd/prep --namespace {kube.namespace}" in notes  # the release's own first dataset
    # The controller ends its own Job at once (no podFailurePolicy on 1.20 to stop its retries), with the reason.
    assert kube.wait_for(lambda: finished(kube, "bad"), RUN_TIMEOUT, "the run to fail") == "Failed", \
        debug(kube, "bad")
    reason = kube.controller_job("bad").metadata.annotations["mysproj.io/failure"]
    assert reason.startswith("stage dtd/prep: bad input (exit 64)") and "no-such-dtd" in reason
    prep = kube.batch.list_namespaced_job(kube.namespace, label_selector="mysproj.io/run=bad,mysproj.io/stage=prep")
    assert "mysproj.io/failure" in prep.items[0].metadata.annotations  # stopped: bad input is never retried
    assert not kube.batch.list_namespaced_job(kube.namespace, label_selector="mysproj.io/stage=finetune,"
                                              "mysproj.io/run=bad").items  # nothing downstream ever started
    # `kubectl describe job bad-mysproj-controller` tells it too: the stage's failure with its reason line.
    story = controller_events(kube, "bad")
    failed = [m for r, m in story if r == "StageFailed"]
    assert len(failed) == 1 and failed[0].startswith("stage dtd/prep failed: "), story
    assert "exit 64" in failed[0] and "no-such-dtd" in failed[0], story
    assert [r for r, _ in story].count("RunFailed") == 1, story

    status = mysproj(env, "status", "bad", "--namespace", kube.namespace)
    assert status.returncode == 1
    prep_row = next(line for line in status.stdout.splitlines() if line.startswith("dtd/prep"))
    assert "failed" in prep_row and "exit 64" in prep_row and "no-such-dtd" in prep_row, status.stdout
    helm(env, "uninstall", "bad", "--namespace", kube.namespace)
    kube.wait_for(lambda: not leftovers(kube, "bad"), 120, "the garbage collector to remove every object")
