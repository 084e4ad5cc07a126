"""helm and `mysproj` as a user runs them against the test cluster: the one copy the Kubernetes tier's tests share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mysproj"
VALUES_TINY = CHART / "values-tiny.yaml"


def helm(env, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(["helm", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}")
    return result


def install(kube, env, release, *sets, bucket: str, verb="install") -> subprocess.CompletedProcess:
    """`helm install` (or `verb`) of values-tiny.yaml with the test images, in the test namespace, on `bucket` of
    the cluster's S3 endpoint; `sets` are further helm arguments."""
    return helm(env, verb, release, str(CHART), "-f", str(VALUES_TINY), "--namespace", kube.namespace,
                *kube.image_values, "--set", f"storage.endpoint={kube.s3_endpoint}",
                "--set", f"storage.bucket={bucket}", *sets)


def mysproj(env, *args, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mysproj.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def controller_events(kube, release: str) -> list[tuple[str, str]]:
    """(reason, message) of the Events on the release's current controller Job, oldest first (what `kubectl get
    events --field-selector involvedObject.name=<release>-mysproj-controller` lists)."""
    job = kube.controller_job(release)
    items = kube.core.list_namespaced_event(kube.namespace,
                                            field_selector=f"involvedObject.name={job.metadata.name}").items
    ours = [e for e in items
            if e.involved_object.uid == job.metadata.uid and e.source.component == "mysproj-controller"]
    return [(e.reason, e.message) for e in sorted(ours, key=lambda e: e.first_timestamp)]
