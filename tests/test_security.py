"""Security scanning in `make test`: checkov over the rendered chart (every example values file, plus the stage Jobs
the controller creates from the chart's templates), the Dockerfiles and the GitHub workflows; bandit over the
package; actionlint over the workflows. Zero failed checks; every skipped check is listed here with the reason it
does not apply, and docs/security.md lists the same IDs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mysproj.config.fields import load_config
from mysproj.kube import jobspec
from mysproj.pipeline import dag
from mysproj.stages.registry import stage_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "mysproj"
TOOLS = REPO / ".tools" / "bin"
VENV_BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"

# checkov IDs skipped, with the reason each does not apply. Keep in sync with docs/security.md (test below).
CHECKOV_SKIPS = {
    "CKV_K8S_11": "CPU limits: deliberately unset; a CPU limit throttles data loading beside the GPUs (CFS quota), "
                  "CPU requests are set so scheduling is right",
    "CKV_K8S_15": "imagePullPolicy Always: images are referenced by an immutable version tag (`images.*.tag`, CI "
                  "pushes `git-<sha>`), re-pulling multi-GB CUDA images for every stage pod buys nothing; "
                  "`images.*.pullPolicy` can set it",
    "CKV_K8S_21": "default namespace: the chart is namespace-agnostic, Helm installs it into `--namespace` "
                  "(many runs per namespace); no object is meant for `default`",
    "CKV_K8S_35": "secrets as files: the AWS SDK reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the "
                  "environment; they come only from a `secretKeyRef` (never values, ConfigMaps or logs)",
    "CKV_K8S_38": "service-account token: only the controller mounts one (it must create and watch the stage "
                  "Jobs); every stage pod sets automountServiceAccountToken: false (tests/test_chart.py)",
    "CKV_K8S_43": "image digests: the tag is the release/commit of the build the same pipeline pushed; a digest "
                  "is not known when the chart is written (set `images.*.tag` to `@sha256:...`-style tags to pin)",
    "CKV2_K8S_6": "NetworkPolicy: the pods serve nothing (batch Jobs; the only listener is rank 0's rendezvous in "
                  "multi-node fine-tuning) and egress to the bucket and API server is needed; the cluster's "
                  "namespace policy applies",
    "CKV_DOCKER_2": "HEALTHCHECK: the images run Kubernetes batch Jobs, which ignore HEALTHCHECK; liveness is the "
                    "process exit code",
    "CKV_GHA_7": "workflow_dispatch inputs: reproduce.yml must take the dataset and seeds to reproduce; they "
                 "choose the experiment, not the build, reach the shell only through env, and are validated "
                 "(choice list, digits-and-commas) before use",
}
# bandit IDs skipped, with the reason each does not apply.
BANDIT_SKIPS = {
    "B311": "`random` seeds data sampling and prompt order for reproducibility, never secrets or tokens",
    "B615": "every `from_pretrained` loads a local folder with `local_files_only=True` (offline, no Hub download "
            "to pin a revision of)",
    "B105": "the flagged strings are tokenizer special tokens (`<unk>`, `<image>`) and config keys, not passwords",
    "B106": "as B105: `unk_token=`/`pad_token=` arguments of a tokenizer, not passwords",
}


def _tool(name: str) -> str:
    for d in (TOOLS, VENV_BIN):
        if os.access(d / name, os.X_OK):
            return str(d / name)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make venv scan-tools`")
    return found


def _helm() -> str:
    return _tool("helm")


def _stage_jobs(docs: list[dict]) -> list[dict]:
    """The stage Jobs the controller would create from this rendering's ConfigMap, one per template kind, built by
    the controller's own code (what really reaches the API server)."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pipeline = load_config(dag.PipelineConfig, overrides=yaml.safe_load(cm["data"]["pipeline.yaml"]), env={})
    jobs: dict[str, dict] = {}
    for node in dag.build(pipeline):
        kind = jobspec.template_kind(node)
        if kind in jobs:
            continue
        cfg = stage_config(node.stage, node.config)
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "scan-mysproj-controller", "uid": "u-1",
                 "blockOwnerDeletion": True}
        jobs[kind] = jobspec.stage_job(yaml.safe_load(cm["data"][f"job-{kind}.yaml"]),
                                       name=jobspec.job_names("scan-mysproj", node, cfg)[0], node=node, cfg=cfg,
                                       owner=owner, gpu=kind != "cpu")
    return list(jobs.values())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """`helm template` of the default values and every example values file, plus their stage Jobs, one file each."""
    out = tmp_path_factory.mktemp("rendered")
    values = [None, *sorted(CHART.glob("values-*.yaml"))]
    for v in values:
        name = "values" if v is None else v.stem
        # CrisisMMD's terms accepted (the examples leave that to the user); the NetworkPolicy scanned too
        args = [_helm(), "template", "scan", str(CHART), "--namespace", "mysproj-runs",
                "--set", "pipeline.accept_terms={crisismmd}", "--set", "networkPolicy.enabled=true"]
        result = subprocess.run(args + ([] if v is None else ["-f", str(v)]), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
        (out / f"{name}-stage-jobs.yaml").write_text(yaml.safe_dump_all(_stage_jobs(docs)))
    return out


def _json_docs(text: str) -> list[dict]:
    """checkov prints one JSON document per scanned folder (list or object); collect them all."""
    dec, i, docs = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        obj, i = dec.raw_decode(text, i)
        docs.extend(obj if isinstance(obj, list) else [obj])


def test_checkov_chart_dockerfiles_and_workflows_have_no_failed_check(rendered):
    cmd = [_tool("checkov"), "-d", str(rendered), "-d", str(REPO / "images"), "-d", str(WORKFLOWS),
           "--framework", "kubernetes", "dockerfile", "github_actions", "--skip-download", "--compact",
           "-o", "json", "--skip-check", ",".join(sorted(CHECKOV_SKIPS))]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    reports = {}
    for doc in _json_docs(result.stdout):
        reports.setdefault(doc["check_type"], doc)
    assert set(reports) == {"kubernetes", "dockerfile", "github_actions"}, result.stdout[-2000:] + result.stderr
    failed = [f"{r['check_type']}: {f['check_id']} {f['check_name']} ({f['resource']} in {f['file_path']})"
              for r in reports.values() for f in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    k8s = reports["kubernetes"]["summary"]
    # Every rendering was scanned: the controller Job and the three stage-Job kinds for each values file.
    scanned = {f["file_path"].lstrip("/") for f in reports["kubernetes"]["results"]["passed_checks"]}
    expected = {p.name for p in rendered.glob("*.yaml")}
    assert expected <= scanned, expected - scanned
    assert k8s["parsing_errors"] == 0 and k8s["passed"] > 0
    assert reports["dockerfile"]["summary"]["passed"] > 0 and reports["github_actions"]["summary"]["passed"] > 0
    assert result.returncode == 0, result.stderr[-2000:]


def test_bandit_finds_nothing_in_the_package():
    cmd = [_tool("bandit"), "-r", str(REPO / "mysproj"), "-q", "-f", "json", "--skip", ",".join(sorted(BANDIT_SKIPS))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    issues = [f"{r['test_id']} {r['filename']}:{r['line_number']} {r['issue_text']}" for r in report["results"]]
    assert not issues, "\n".join(issues)
    assert not report["errors"], report["errors"]
    assert report["metrics"]["_totals"]["loc"] > 1000  # it really scanned the package
    assert result.returncode == 0


def test_actionlint_passes_on_the_workflows():
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert {p.name for p in workflows} >= {"ci.yml", "reproduce.yml"}
    # actionlint must run inside the git work tree (it resolves the repository root).
    result = subprocess.run([_tool("actionlint"), *map(str, workflows)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_script_injection(tmp_path):
    """The linter really checks: an input spliced into `run:` is reported (the workflows pass inputs via env)."""
    bad = WORKFLOWS / f"zz-injection-probe-{os.getpid()}.yml"
    bad.write_text("on:\n  pull_request:\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo \"${{ github.event.pull_request.title }}\"\n")
    try:
        result = subprocess.run([_tool("actionlint"), str(bad)], capture_output=True, text=True, cwd=REPO,
                                timeout=120)
    finally:
        bad.unlink()
    assert result.returncode != 0 and "potentially untrusted" in result.stdout, result.stdout + result.stderr


def test_workflows_follow_the_reproduce_contract():
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    rep = yaml.safe_load((WORKFLOWS / "reproduce.yml").read_text())
    on_ci, on_rep = ci[True] if True in ci else ci["on"], rep[True] if True in rep else rep["on"]
    assert {"push", "pull_request"} <= set(on_ci)
    assert any("make test" in (s.get("run") or "") for s in ci["jobs"]["test"]["steps"])
    cached = {s["with"]["path"] for s in ci["jobs"]["test"]["steps"] if "actions/cache" in (s.get("uses") or "")}
    assert cached == {"/var/cache/mysproj-k8s", "/var/cache/mysproj-images", "/root/.cache/pip"}
    # podman and the pods' network namespace need a privileged job container.
    assert ci["jobs"]["test"]["container"]["options"] == "--privileged"
    assert set(on_rep["workflow_dispatch"]["inputs"]) == {"dataset", "seeds"} and on_rep["schedule"]
    steps = rep["jobs"]["reproduce"]["steps"]
    runs = "\n".join(s.get("run") or "" for s in steps)
    assert "make reproduce" in runs and "${{" not in runs  # inputs and secrets reach scripts only via env
    assert "secrets.MYSPROJ_KUBECONFIG" in json.dumps(rep) and "vars.MYSPROJ_REGISTRY" in json.dumps(rep)
    assert any("upload-artifact" in (s.get("uses") or "") for s in steps)
    for wf in (ci, rep):
        assert wf["permissions"] == {"contents": "read"}


def test_security_page_lists_every_skipped_check():
    page = (REPO / "docs" / "security.md").read_text()
    missing = [i for i in (*CHECKOV_SKIPS, *BANDIT_SKIPS) if i not in page]
    assert not missing, f"docs/security.md does not list the skipped checks {missing}"
