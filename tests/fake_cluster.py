"""An in-memory stand-in for `mysproj.kube.cluster.Cluster` (the same dict shapes as the real API), and a controller
over it with its stage outputs in a local run root. The real API server runs the same code in tests/kube/."""

from __future__ import annotations

import copy

import yaml

from mysproj.kube import controller as C
from mysproj.kube import jobspec
from mysproj.storage.manifest import StageOutput

TEMPLATE = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"labels": {"mysproj.io/run": "r1", "app.kubernetes.io/component": "stage"}},
            "spec": {"backoffLimit": 2, "template": {
                "metadata": {"labels": {"mysproj.io/run": "r1", "app.kubernetes.io/component": "stage"}},
                "spec": {"restartPolicy": "Never",
                         "containers": [{"name": "stage", "image": "x", "command": ["python", "-u"], "env": []}]}}}}


class FakeCluster:
    """The `mysproj.kube.cluster.Cluster` methods over dicts; label selectors are `k=v,k=v`."""

    namespace = "ns"

    def __init__(self, pipeline: dict):
        data = {"pipeline.yaml": yaml.safe_dump(pipeline)}
        for kind in ("cpu", "gpu", "finetune", "fetch"):
            data[f"job-{kind}.yaml"] = yaml.safe_dump(TEMPLATE)
        self.configmaps = {"r1-pipeline": {"metadata": {"name": "r1-pipeline", "labels": {
            "mysproj.io/run": "r1", "app.kubernetes.io/component": "pipeline"}}, "data": data}}
        self.jobs: dict[str, dict] = {"r1-controller": {"metadata": {
            "name": "r1-controller", "uid": "uid-ctl", "labels": {"mysproj.io/run": "r1", "mysproj.io/stage":
                                                                  "controller", "app.kubernetes.io/component":
                                                                  "controller"}}, "status": {"active": 1}}}
        self.pods: dict[str, dict] = {}
        self.stopped: dict[str, dict] = {}
        self.events: dict[str, dict] = {}  # by name, in creation order

    @staticmethod
    def _match(obj, selector):
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in (kv.split("=") for kv in selector.split(",") if kv))

    def read_configmap(self, name):
        return self.configmaps[name]

    def list_configmaps(self, selector):
        return [c for c in self.configmaps.values() if self._match(c, selector)]

    def read_job(self, name):
        return self.jobs[name]

    def list_jobs(self, selector):
        return [copy.deepcopy(j) for j in self.jobs.values() if self._match(j, selector)]

    def list_pods(self, selector):
        return [copy.deepcopy(p) for p in self.pods.values() if self._match(p, selector)]

    def pod_log(self, name, tail_lines=None):
        return f"log of {name}\n"

    def create_job(self, body):
        name = body["metadata"]["name"]
        if name in self.jobs:
            return False
        self.jobs[name] = {**copy.deepcopy(body), "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}
        return True

    def stop_job(self, name, annotations):
        self.stopped[name] = annotations
        self.jobs[name]["metadata"].setdefault("annotations", {}).update(annotations)

    def annotate_job(self, name, annotations):
        self.jobs[name]["metadata"].setdefault("annotations", {}).update(annotations)

    def end_job(self, name, annotations):
        self.stop_job(name, annotations)
        self.jobs[name]["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]

    def create_event(self, body):
        name = body["metadata"]["name"]
        if name in self.events:
            return False
        self.events[name] = copy.deepcopy(body)
        return True

    def list_events(self, involved):
        return [e for e in self.events.values() if e["involvedObject"]["name"] == involved]

    def told(self):
        """(reason, message) of every Event, in order."""
        return [(e["reason"], e["message"]) for e in self.events.values()]

    # -- what the Job controller and the kubelet would do -------------------------------------------------------
    def finish(self, name, exit_code=0):
        job = self.jobs[name]
        labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": name}
        pod = {"metadata": {"name": f"{name}-{len(self.pods)}", "labels": labels},
               "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [
                   {"name": "stage", "state": {"terminated": {"exitCode": exit_code, "message": "boom"}}}]}}
        self.pods[pod["metadata"]["name"]] = pod
        if exit_code == 0:
            job["status"] = {"succeeded": 1, "startTime": "2026-01-01T00:00:00Z",
                             "completionTime": "2026-01-01T00:01:00Z",
                             "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            job["status"] = {"failed": 1, "active": 1, "startTime": "2026-01-01T00:00:00Z"}

    def start(self, name):
        """A running pod of Job `name` (its name returned)."""
        job = self.jobs[name]
        pod = f"{name}-{len(self.pods)}"
        self.pods[pod] = {"metadata": {"name": pod, "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                                                "job-name": name}},
                          "status": {"phase": "Running"}}
        return pod

    def stage_jobs(self):
        return {j["metadata"]["annotations"][jobspec.ANN_NODE]: n for n, j in self.jobs.items()
                if "annotations" in j["metadata"]}


def make_controller(tmp_path, cluster=None, **kw):
    pipeline = {"root": str(tmp_path / "run"), "strategies": ["projector"], "overrides": {"finetune": {"max_steps": 2}}}
    cluster = cluster or FakeCluster(pipeline)
    kw.setdefault("controller_job", "r1-controller")
    cfg = C.ControllerConfig(release="r1", namespace="ns", fullname="r1-mysproj", configmap="r1-pipeline",
                             poll_seconds=0, **kw)
    return C.Controller(cfg, cluster), cluster


def complete_output(ctl, node_name, summary=None):
    """Commit the manifest the stage would have written (what `run_stage` checks before skipping)."""
    node = next(n for n in ctl.nodes if n.name == node_name)
    cfg = ctl.configs[node_name]
    StageOutput(cfg.out, node.stage, cfg).commit(summary)
