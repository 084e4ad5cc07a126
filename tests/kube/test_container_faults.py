"""What breaks first on a real cluster, with every pod a real container: an image that lacks a module, a stage that
writes to its read-only root, an image missing on the node. Each fails its run with one clear reason in `mysproj
status` and leaves nothing waiting; none hangs (a kubelet keeps a pod with a missing image Waiting forever, so the
controller has to fail the stage itself). The three releases run side by side in one namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from releases import install

pytestmark = [pytest.mark.kube, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "mysproj-container-faults"
TIMEOUT = 300
READ_ONLY_CACHE = {"name": "MYSPROJ_CACHE_DIR", "value": "/app/cache"}  # not below the scratch volume


@pytest.fixture(scope="module")
def run_env(kube, s3_server):
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.start()
    s3_server.create_bucket(BUCKET)
    kube.core.create_namespaced_secret(kube.namespace, {
        "metadata": {"name": "mysproj-s3"}, "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    return kube, s3_server, {**kube.env, **s3_server.env()}


def controller_failed(kube, release: str) -> bool:
    job = kube.controller_job(release)
    return any(c.type == "Failed" and c.status == "True" for c in job.status.conditions or [])


def status_rows(env, kube, release: str) -> tuple[int, dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "mysproj", "status", release, "--namespace", kube.namespace],
                            env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    return result.returncode, rows


def active_pods(kube, release: str) -> list[str]:
    return [p.metadata.name for p in kube.pods(f"mysproj.io/run={release},app.kubernetes.io/component=stage")
            if p.status.phase in ("Pending", "Running")]


@pytest.mark.timeout(TIMEOUT + 120)
def test_broken_images_and_a_read_only_root_fail_the_run_with_the_reason(run_env):
    kube, s3, env = run_env
    cpu_repository, cpu_tag = kube.images["cpu"].rsplit(":", 1)
    cases = {
        # The GPU stages (model-init first) get an image that does not exist on the node.
        "noimage": (["--set", "images.gpu.tag=no-such-tag"], "models/tiny",
                    ["failed", "ErrImageNeverPull", "mysproj-gpu:no-such-tag"]),
        # ... or the slim CPU image, which has no torch.
        "nomodule": (["--set", f"images.gpu.repository={cpu_repository}", "--set", f"images.gpu.tag={cpu_tag}"],
                     "models/tiny", ["failed", "exit 64", "lacks the Python module 'torch'"]),
        # A cache folder outside the scratch volume: on the read-only root.
        "readonly": (["--set-json", f"stages.extraEnv={json.dumps([READ_ONLY_CACHE])}"], "textures-mini/prep",
                     ["failed", "exit 64", "/app/cache is on the read-only root file system"]),
    }
    for release, (sets, _, _) in cases.items():
        install(kube, env, release, "--set", "pipeline.zero_shot=false", "--set", "pipeline.probe=false", *sets,
                bucket=BUCKET)
    for release in cases:
        kube.wait_for(lambda r=release: controller_failed(kube, r), TIMEOUT, f"run {release} to fail", interval=1)
    for release, (_, stage, expected) in cases.items():
        code, rows = status_rows(env, kube, release)
        assert code == 1, rows
        assert all(text in rows[stage] for text in expected), (release, rows[stage])
        assert "mysproj.io/failure" in (kube.batch.read_namespaced_job(
            rows[stage].split()[1], kube.namespace).metadata.annotations or {}), rows[stage]
        kube.wait_for(lambda r=release: not active_pods(kube, r) or None, 120, f"{release}: no pod left waiting")
    for release in cases:
        subprocess.run(["helm", "uninstall", release, "--namespace", kube.namespace], env=env, capture_output=True)
