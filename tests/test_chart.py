"""The Helm chart: lint, schema, offline validation against a current Kubernetes version, and the security and RBAC
properties of what it renders (including the stage Job templates the controller instantiates from its ConfigMap)."""

from __future__ import annotations

import dataclasses
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
from mysproj.kube.values_schema import dataset_names, stage_overrides_schema
from mysproj.pipeline import dag
from mysproj.stages.registry import stage_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "mysproj"
EXAMPLES = sorted(p.name for p in CHART.glob("values-*.yaml"))
K8S_VERSION = "1.30.0"


def _helm() -> str:
    found = REPO / ".tools" / "bin" / "helm"
    path = str(found) if os.access(found, os.X_OK) else shutil.which("helm")
    if not path:
        pytest.skip("helm is not installed: run `make tools`")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([_helm(), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def render(*args: str, release: str = "run-a") -> list[dict]:
    out = helm("template", release, str(CHART), "--namespace", "exp", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(docs: list[dict]) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    text = yaml.safe_dump_all(docs)
    result = subprocess.run([str(tool), "--strict", "-k", K8S_VERSION, "-"], input=text, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def stage_jobs(docs: list[dict]) -> dict[str, dict]:
    """The ConfigMap's stage Job templates, instantiated by the controller's own code for a node of each kind."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pipeline = load_config(dag.PipelineConfig, overrides=yaml.safe_load(cm["data"]["pipeline.yaml"]), env={})
    jobs = {}
    for node in dag.build(pipeline):
        kind = jobspec.template_kind(node)
        if kind in jobs:
            continue
        cfg = stage_config(node.stage, node.config)
        name = jobspec.job_names("run-a-mysproj", node, cfg)[0]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "run-a-mysproj-controller", "uid": "u-1",
                 "blockOwnerDeletion": True}
        jobs[kind] = jobspec.stage_job(yaml.safe_load(cm["data"][f"job-{kind}.yaml"]), name=name, node=node, cfg=cfg,
                                       owner=owner, gpu=kind in jobspec.GPU_KINDS)
    return jobs


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    jobs = [d for d in docs if d["kind"] == "Job"] + list(stage_jobs(docs).values())
    return [(j["metadata"]["name"], j["spec"]["template"]["spec"]) for j in jobs]


# CrisisMMD's terms must be accepted by the user: the examples leave that line commented out.
ACCEPT = ("--set", "pipeline.accept_terms={crisismmd}")


def test_lint_strict_default_and_examples():
    helm("lint", "--strict", str(CHART))
    for values in EXAMPLES:
        helm("lint", "--strict", str(CHART), "-f", str(CHART / values), *ACCEPT)


@pytest.mark.parametrize("values", EXAMPLES)
def test_examples_validate_against_a_current_kubernetes(values):
    docs = render("-f", str(CHART / values), "--set", "bench.enabled=true", "--set", "networkPolicy.enabled=true",
                  *ACCEPT)
    kinds = {d["kind"] for d in docs}
    assert {"Job", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    validate(docs + list(stage_jobs(docs).values()))


def test_the_example_set_is_complete():
    assert set(EXAMPLES) >= {"values-dtd.yaml", "values-plantdoc.yaml", "values-dermnet.yaml",
                             "values-crisismmd.yaml", "values-paper.yaml", "values-tiny.yaml"}
    paper = yaml.safe_load((CHART / "values-paper.yaml").read_text())["pipeline"]
    assert set(paper["datasets"]) == {"dtd", "plantdoc", "dermnet", "crisismmd"} and paper["seeds"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("args, message", [
    (["--set", "storage.bukket=x"], "bukket"),
    (["--set", "controller.maxParallelGpuJobs=many"], "maxParallelGpuJobs"),
    (["--set", "pipeline.overrides.finetune.max_stepz=3"], "max_stepz"),
    (["--set", "pipeline.datasets={imagenet}"], "datasets"),
    (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    # The pipeline would refuse these only once its controller runs: refused at install time instead.
    # (dtd, plantdoc and dermnet default to their published origins; imagefolder has none)
    (["--set-json", 'pipeline.datasets=["imagefolder"]'], "pipeline.sources has no entry for dataset 'imagefolder'"),
    (["--set-json", 'pipeline.datasets=["imagefolder"]', "--set", "pipeline.sources.imagefolder="],
     "no entry for dataset 'imagefolder'"),
    (["-f", str(CHART / "values-crisismmd.yaml")], "terms you must accept first (https://crisisnlp.qcri.org/crisismmd)"),
    (["--set", "pipeline.accept_terms={mnist}"], "accept_terms"),
])
def test_schema_rejects_typos_and_wrong_types(args, message):
    result = helm("template", "r", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_schema_is_strict_at_every_level_and_follows_the_dataclasses():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")

    walk(schema, "$")
    pipeline = schema["properties"]["pipeline"]["properties"]
    assert set(pipeline) == {f.name for f in dataclasses.fields(dag.PipelineConfig)}
    assert pipeline["overrides"] == stage_overrides_schema(), (
        "a stage config changed: run `python -m mysproj.kube.values_schema charts/mysproj/values.schema.json`")
    for name in ("datasets", "accept_terms"):
        assert pipeline[name]["items"]["enum"] == dataset_names(), (
            "a dataset record changed: run `python -m mysproj.kube.values_schema charts/mysproj/values.schema.json`")


def test_pipeline_config_is_the_dataclass_with_the_run_root():
    docs = render("--set", "storage.bucket=b", "--set", "storage.prefix=p")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pipeline = yaml.safe_load(cm["data"]["pipeline.yaml"])
    assert pipeline["root"] == "s3://b/p/run-a"
    cfg = load_config(dag.PipelineConfig, overrides=pipeline, env={})
    assert cfg.datasets == ["textures-mini"]


def test_pods_are_hardened():
    docs = render("-f", str(CHART / "values-paper.yaml"), "--set", "bench.enabled=true", *ACCEPT)
    specs = pod_specs(docs)
    assert len(specs) >= 5  # controller, bench, and the cpu/gpu/finetune stage templates
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            env = {e["name"]: e for e in c["env"]}
            for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MYSPROJ_CACHE_DIR", "HF_HOME", "MPLCONFIGDIR",
                        "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
                scratch = next(p for p in mounts if env[var]["value"].startswith(p + "/"))
                assert "emptyDir" in volumes[mounts[scratch]], (name, var)
            for secret_var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert set(env[secret_var]) == {"name", "valueFrom"}
                assert env[secret_var]["valueFrom"]["secretKeyRef"]["name"] == "mysproj-s3"
            if c["resources"].get("limits", {}).get("nvidia.com/gpu"):
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        if "controller" not in name:
            assert spec["automountServiceAccountToken"] is False, name
    stage = stage_jobs(docs)
    assert stage["finetune"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert stage["gpu"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    rules = stage["cpu"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [64]


def test_only_fetch_pods_reach_out_and_get_the_hub_and_kaggle_tokens():
    docs = render("-f", str(CHART / "values-dermnet.yaml"), "--set", "fetch.hfTokenSecret=hf",
                  "--set", "networkPolicy.enabled=true", "--set-json", 'networkPolicy.egressTo=[{"ipBlock": '
                  '{"cidr": "10.0.0.5/32"}}]')
    stage = stage_jobs(docs)
    assert set(stage) == {"fetch", "cpu", "gpu", "finetune"}
    for kind, job in stage.items():
        pod = job["spec"]["template"]
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        fetch = kind == "fetch"
        assert (pod["metadata"]["labels"].get("mysproj.io/egress") == "true") == fetch, kind
        assert env["HF_HUB_OFFLINE"]["value"] == ("0" if fetch else "1"), kind
        assert ({"HF_TOKEN", "KAGGLE_API_TOKEN", "KAGGLE_KEY"} <= set(env)) == fetch, kind
    fetch_pod = stage["fetch"]["spec"]["template"]["spec"]
    container = fetch_pod["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {}) and "nodeSelector" not in fetch_pod
    assert container["image"].startswith("ghcr.io/mysproj/mysproj-gpu")  # torch converts pickled weights
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert env["KAGGLE_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mysproj-kaggle"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchExpressions"] == [{"key": "mysproj.io/egress",
                                                                 "operator": "DoesNotExist"}]
    assert policy["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.5/32"}}]
    assert not [d for d in render() if d["kind"] == "NetworkPolicy"]


def test_no_credentials_in_values_or_configmaps():
    docs = render("--set", "storage.endpoint=http://s3.local:8333")
    text = yaml.safe_dump_all([d for d in docs if d["kind"] == "ConfigMap"])
    assert "AWS_SECRET_ACCESS_KEY\n" not in text.replace("key: AWS_SECRET_ACCESS_KEY", "")
    for d in docs:
        assert d["kind"] != "Secret"


def test_rbac_is_namespace_scoped_and_minimal():
    docs = render()
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = next(d for d in docs if d["kind"] == "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules) == {(("batch",), ("jobs",)), (("",), ("pods",)), (("",), ("pods/log",)),
                          (("",), ("configmaps",)), (("",), ("events",))}
    assert set(rules[("batch",), ("jobs",)]["verbs"]) <= {"create", "get", "list", "watch", "delete", "patch"}
    assert set(rules[("",), ("pods",)]["verbs"]) == {"get", "list", "watch"}
    assert rules[("",), ("configmaps",)]["verbs"] == ["get"]
    assert rules[("",), ("configmaps",)]["resourceNames"] == ["run-a-mysproj-pipeline"]
    assert rules[("",), ("events",)]["verbs"] == ["create", "patch"]  # the run's story on the controller Job
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "exp"}]
    controller = next(d for d in docs if d["kind"] == "Job")
    assert controller["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_each_revision_has_its_own_controller_job():
    """`helm upgrade` renders a new controller Job (Helm deletes the previous revision's), so changed values run;
    the controller owns its stage Jobs by this name."""
    job = next(d for d in render() if d["kind"] == "Job")
    assert job["metadata"]["name"] == "run-a-mysproj-controller-1"
    assert job["metadata"]["labels"]["mysproj.io/revision"] == "1"
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MYSPROJ_CONTROLLER_JOB"] == job["metadata"]["name"]
    long = next(d for d in render(release="a" * 53) if d["kind"] == "Job")["metadata"]["name"]
    assert len(long) <= 63 and long.endswith("-1")


def test_labels_and_release_scoped_names():
    a, b = render(release="run-a"), render(release="run-b")
    names_a = {(d["kind"], d["metadata"]["name"]) for d in a}
    names_b = {(d["kind"], d["metadata"]["name"]) for d in b}
    assert not names_a & names_b
    for d in a:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "run-a" and labels["mysproj.io/run"] == "run-a"
        assert labels["app.kubernetes.io/name"] == "mysproj" and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert d["metadata"]["name"].startswith("run-a")
    long = render(release="a" * 50)
    assert all(len(d["metadata"]["name"]) <= 63 for d in long)


def test_multi_node_finetune_has_a_headless_service():
    assert not [d for d in render() if d["kind"] == "Service"]
    docs = render("--set", "finetune.nodes=2")
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"]["mysproj.io/rank"] == "0"
    controller = next(d for d in docs if d["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MYSPROJ_FINETUNE_NODES"] == "2" and env["MYSPROJ_FINETUNE_SERVICE"] == svc["metadata"]["name"]



def test_newer_job_fields_only_where_the_server_has_them():
    """Helm validates against the server's schema: a 1.20 server would refuse podFailurePolicy (the controller
    handles exit 64 itself there)."""
    old = render("--kube-version", "1.20.2")
    assert "podFailurePolicy" not in yaml.safe_dump_all(old)
    assert "podFailurePolicy" not in yaml.safe_dump_all(list(stage_jobs(old).values()))
    current = render("--kube-version", "1.30.0")
    assert all("podFailurePolicy" in j["spec"] for j in [d for d in current if d["kind"] == "Job"]
               + list(stage_jobs(current).values()))


def test_tracking_settings_and_credentials_reach_the_pods_only_by_reference():
    docs = render("--set", "trackingSecret=mlflow-creds", "--set", "pipeline.tracking.mlflow_uri=http://mlflow:5000",
                  "--set", "pipeline.tracking.tensorboard=false")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "pipeline.yaml" in d.get("data", {}))
    pipeline = yaml.safe_load(cm["data"]["pipeline.yaml"])
    assert pipeline["tracking"] == {"tensorboard": False, "mlflow_uri": "http://mlflow:5000",
                                    "mlflow_experiment": "mysproj", "wandb_project": None}
    controller = next(d for d in docs if d["kind"] == "Job")
    templates = [controller, *(yaml.safe_load(cm["data"][k]) for k in cm["data"] if k.startswith("job-"))]
    for job in templates:
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        token = env["MLFLOW_TRACKING_TOKEN"]
        assert "value" not in token and token["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-creds", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-creds"
        # the image a pod runs in, for the MLflow runs' `mysproj.image` tag
        assert env["MYSPROJ_IMAGE"]["value"] == job["spec"]["template"]["spec"]["containers"][0]["image"]
    refused = helm("template", "run-a", str(CHART), "--set", "pipeline.tracking.mlflow=x", check=False)
    assert refused.returncode != 0 and "mlflow is not allowed" in refused.stderr  # no such tracking setting
