"""Stage-in on the real control plane: a release whose dataset is named only by its origin URL (served by a real
HTTP server the pods reach, nothing staged in the bucket) fetches it in a fetch Job, runs to its report, resumes a
fetch pod killed mid-download from the pieces it kept in the bucket, and a second release on the same bucket
fetches nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tarfile

import pytest
from dataset_layouts import make_dtd
from releases import helm
from test_pipeline_e2e import RUN_TIMEOUT, debug, finished, install
from test_pipeline_e2e import run_env as run_env  # noqa: F401 - the module-scoped fixture, used here too

pytestmark = [pytest.mark.kube, pytest.mark.s3]
ARCHIVE = "dtd-r1.0.1.tar.gz"


def dtd_archive(folder) -> bytes:
    """DTD as published, with 3 MiB that do not compress: four 1 MiB pieces to fetch."""
    make_dtd(str(folder), per_split=2)
    (folder / "dtd/imdb").mkdir()
    (folder / "dtd/imdb/imdb.mat").write_bytes(os.urandom(3 << 20))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(str(folder / "dtd"), arcname="dtd")
    return buf.getvalue()


def origin_values(url: str, *extra: str) -> list[str]:
    return ["--set-json", 'pipeline.datasets=["dtd"]', "--set-json", json.dumps({"dtd": url}).join(
        ["pipeline.sources=", ""]), "--set", "pipeline.overrides.fetch.chunk_mib=1",
            "--set", "pipeline.overrides.fetch.connections=1", *extra]


def fetch_jobs(kube, release):
    return kube.batch.list_namespaced_job(kube.namespace, label_selector=f"mysproj.io/run={release},"
                                          f"mysproj.io/stage=fetch").items


def test_a_release_naming_only_an_origin_fetches_it_once_and_resumes_a_killed_fetch(run_env, pod_origin,  # noqa: F811
                                                                                  tmp_path):
    kube, s3, env = run_env
    data = dtd_archive(tmp_path)
    url = pod_origin.add(ARCHIVE, data).replace("127.0.0.1", kube.origin_host)
    url += f"#sha256={hashlib.sha256(data).hexdigest()}"
    # the server answers the size probe and one piece, then holds the next request until released
    pod_origin.faults.release.clear()
    pod_origin.faults.hold[ARCHIVE] = 2
    install(kube, env, "stagein", *origin_values(url))

    def fetching_pod():
        # its third request is held: with one connection a piece is stored before the next one is asked for
        asked = sum(1 for _, path, _ in list(pod_origin.requests) if path == f"/{ARCHIVE}")
        pods = [p for p in kube.pods("mysproj.io/stage=fetch") if kube.is_running(p.metadata.name)]
        return pods[0].metadata.name if pods and asked >= 3 else None

    victim = kube.wait_for(fetching_pod, RUN_TIMEOUT, "the fetch pod to be mid-download", interval=0.2)
    # Killed outright, as a lost node or the OOM killer does; its Job runs a new pod. Gone before the origin lets the
    # held request go on, so every byte served after this point went to the new pod.
    killed = kube.kill(victim)
    kube.wait_for(lambda: not pathlib.Path(f"/proc/{killed}").exists(), 60, "the killed fetch process to be gone",
                  interval=0.1)
    first = pod_origin.served(ARCHIVE)
    del pod_origin.faults.hold[ARCHIVE]
    pod_origin.faults.release.set()
    assert kube.wait_for(lambda: finished(kube, "stagein"), RUN_TIMEOUT, "the run to finish") == "Complete", \
        debug(kube, "stagein")
    second = pod_origin.served(ARCHIVE) - first
    assert 0 < second < len(data), (first, second, len(data))  # the replacement pod fetched only what was missing
    fs = s3.filesystem()
    cache = [p for p in fs.ls("mysproj-e2e/runs/cache/sources") if "dtd-r1.0.1-" in p]
    assert len(cache) == 1
    manifest = json.loads(fs.cat(f"{cache[0]}/_SUCCESS.json"))
    assert manifest["stage"] == "fetch" and manifest["summary"]["origins"][0]["verified"] == "sha256 pin"
    # no piece left (SeaweedFS keeps the emptied folder, which answers HEAD but lists nothing)
    assert not [p for p in fs.find(cache[0]) if "/_partial/" in p]
    assert fs.exists("mysproj-e2e/runs/stagein/report/report.md")
    assert len(fetch_jobs(kube, "stagein")) == 1

    # a second release on the same bucket: the fetch is complete in the cache, no fetch Job, no byte served
    served = pod_origin.served(ARCHIVE)
    install(kube, env, "stagein2", *origin_values(url, "--set", "pipeline.zero_shot=false",
                                                      "--set", "pipeline.probe=false"))
    kube.wait_for(lambda: fs.exists("mysproj-e2e/runs/stagein2/dtd/prep/_SUCCESS.json"), RUN_TIMEOUT,
                  "the second release's prep, from the cached fetch")
    assert pod_origin.served(ARCHIVE) == served and not fetch_jobs(kube, "stagein2")
    for release in ("stagein", "stagein2"):
        helm(env, "uninstall", release, "--namespace", kube.namespace, "--wait")
