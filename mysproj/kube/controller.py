"""The pipeline controller: runs the DAG of `mysproj.pipeline.dag` as one Kubernetes Job per stage.

It runs as a Job itself (jobs/controller.py, slim CPU image) and keeps no state of its own: every pass re-reads
the stage Jobs (by label) and, for nodes without a Job, the stage output's manifest in object storage. So a
killed and restarted controller, or a re-install of the same values, picks up where the run stopped, and a stage
whose output is already complete with the same config is not run again.

Each pass: a node whose dependencies are complete gets its Job(s) created from the chart's template (owned by the
controller Job, so `helm uninstall` removes them), GPU Jobs up to `max_parallel_gpu_jobs`. A Job that fails for
good (bad-input exit 64, or its backoffLimit spent) fails the run with its reason: the controller exits 64.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import yaml

from mysproj.config.fields import config_hash, load_config, opt
from mysproj.errors import EXIT_BAD_INPUT, BadInput, redact
from mysproj.kube import jobspec
from mysproj.pipeline import dag
from mysproj.stages.registry import STAGES
from mysproj.storage import join, read_text
from mysproj.storage.manifest import read_manifest

log = logging.getLogger(__name__)
FINISHED = ("complete", "reused")
MAX_CONSECUTIVE_ERRORS = 30


@dataclass(kw_only=True)
class ControllerConfig:
    release: str = opt(help="Helm release (the run's name; value of the mysproj.io/run label)")
    namespace: str = opt("default", help="namespace of the run")
    fullname: str = opt(help="release-scoped name prefix of the run's objects")
    configmap: str = opt(help="ConfigMap holding pipeline.yaml and the stage Job templates")
    controller_job: str = opt("", help="this controller's own Job (the owner of every stage Job); empty = none")
    max_parallel_gpu_jobs: int = opt(4, help="most GPU stage Jobs running at once; 0 = no cap", min=0)
    poll_seconds: float = opt(10.0, help="seconds between reconcile passes", min=0.0)
    finetune_nodes: int = opt(1, help="nodes (Jobs) per fine-tuning run", min=1)
    finetune_service: str = opt("", help="headless Service giving node rank 0 a DNS name (multi-node)")


def stage_config(node: dag.Node) -> Any:
    return load_config(STAGES[node.stage][0], overrides=node.config, env={})


def read_pipeline(cluster, configmap: str) -> tuple[dag.PipelineConfig, dict[str, dict]]:
    data = cluster.read_configmap(configmap).get("data") or {}
    if "pipeline.yaml" not in data:
        raise BadInput(f"ConfigMap {configmap} has no pipeline.yaml; install the run with the mysproj chart")
    values = yaml.safe_load(data["pipeline.yaml"]) or {}
    pipeline = load_config(dag.PipelineConfig, overrides=values, env={})
    templates = {k: yaml.safe_load(data[f"job-{k}.yaml"]) for k in ("cpu", "gpu", "finetune")
                 if f"job-{k}.yaml" in data}
    return pipeline, templates


def read_failure_record(out: str) -> dict | None:
    try:
        return json.loads(read_text(join(out, jobspec.FAILURE_RECORD)))
    except (FileNotFoundError, json.JSONDecodeError, BadInput):
        return None


def output_complete(node: dag.Node, cfg: Any) -> bool:
    """The same test `run_stage` makes before skipping: a manifest of this stage with this config hash."""
    try:
        m = read_manifest(cfg.out)
    except BadInput:
        return False
    return bool(m) and m.get("stage") == node.stage and m.get("config_hash") == config_hash(cfg)


@dataclass
class PassResult:
    states: dict[str, jobspec.JobState]
    created: list[str]

    @property
    def failed(self) -> dict[str, jobspec.JobState]:
        return {n: s for n, s in self.states.items() if s.state == "failed" and s.final}

    @property
    def done(self) -> bool:
        return all(s.state in FINISHED for s in self.states.values())


class Controller:
    def __init__(self, cfg: ControllerConfig, cluster):
        self.cfg = cfg
        self.cluster = cluster
        pipeline, self.templates = read_pipeline(cluster, cfg.configmap)
        self.nodes = dag.build(pipeline)
        # Every stage config is validated before any Job exists: a typo fails in seconds, not after training.
        self.configs = {n.name: stage_config(n) for n in self.nodes}
        missing = {jobspec.template_kind(n) for n in self.nodes} - set(self.templates)
        if missing:
            raise BadInput(f"ConfigMap {cfg.configmap} lacks the job template(s) {sorted(missing)}")
        self.owner = jobspec.owner_reference(cluster.read_job(cfg.controller_job)) if cfg.controller_job else None
        self.names = {n.name: jobspec.job_names(cfg.fullname, n, self.configs[n.name], cfg.finetune_nodes)
                      for n in self.nodes}
        self._reused: set[str] = set()  # positive manifest checks only: a cache, never the source of truth
        self.ended = False  # this controller's own Job was ended with a failure reason

    def _selector(self) -> str:
        return f"{jobspec.LABEL_RUN}={self.cfg.release},app.kubernetes.io/component=stage"

    def step(self) -> PassResult:
        jobs = {j["metadata"]["name"]: j for j in self.cluster.list_jobs(self._selector())}
        pods_by_job: dict[str, list[dict]] = {}
        for p in self.cluster.list_pods(self._selector()):
            pods_by_job.setdefault(((p.get("metadata") or {}).get("labels") or {}).get("job-name", ""), []).append(p)
        gpu_running = sum(1 for j in jobs.values() if _labels(j).get(jobspec.LABEL_GPU) == "true"
                          and jobspec.classify(j, pods_by_job.get(j["metadata"]["name"], [])).state
                          in ("pending", "running"))
        states: dict[str, jobspec.JobState] = {}
        created: list[str] = []
        for node in self.nodes:
            cfg = self.configs[node.name]
            present = [jobs[n] for n in self.names[node.name] if n in jobs]
            if present:
                record = None
                job_states = [jobspec.classify(j, pods_by_job.get(j["metadata"]["name"], [])) for j in present]
                if any(s.state != "complete" and (s.reason or pods_by_job.get(j["metadata"]["name"]))
                       for s, j in zip(job_states, present)):
                    record = read_failure_record(cfg.out)
                    job_states = [jobspec.classify(j, pods_by_job.get(j["metadata"]["name"], []), record)
                                  for j in present]
                states[node.name] = jobspec.combine(job_states)
                continue
            if not all(states[d].state in FINISHED for d in node.deps):
                states[node.name] = jobspec.JobState("waiting")
                continue
            if node.name in self._reused or output_complete(node, cfg):
                self._reused.add(node.name)
                states[node.name] = jobspec.JobState("reused")
                continue
            gpu = jobspec.template_kind(node) != "cpu"
            if gpu and self.cfg.max_parallel_gpu_jobs and gpu_running >= self.cfg.max_parallel_gpu_jobs:
                states[node.name] = jobspec.JobState("waiting", reason="GPU job cap reached")
                continue
            created.extend(self._create(node, cfg))
            gpu_running += len(self.names[node.name]) if gpu else 0
            states[node.name] = jobspec.JobState("pending")
        failed = {n: s for n, s in states.items() if s.state == "failed" and s.final}
        for name, st in failed.items():
            for job_name in self.names[name]:
                job = jobs.get(job_name)
                if job and jobspec.ANN_FAILURE not in ((job["metadata"].get("annotations")) or {}):
                    # Stops 1.20 servers (no podFailurePolicy) from retrying a bad input; keeps the reason.
                    self.cluster.stop_job(job_name, {jobspec.ANN_FAILURE: st.reason[:1000]})
        return PassResult(states, created)

    def _create(self, node: dag.Node, cfg: Any) -> list[str]:
        names = self.names[node.name]
        kind = jobspec.template_kind(node)
        multi = len(names) > 1
        master = f"{names[0]}.{self.cfg.finetune_service}" if multi and self.cfg.finetune_service else None
        created = []
        for rank, name in enumerate(names):
            body = jobspec.stage_job(self.templates[kind], name=name, node=node, cfg=cfg, owner=self.owner,
                                     gpu=kind != "cpu", rank=rank if multi else None, nnodes=len(names), master=master)
            if self.cluster.create_job(body):
                log.info("created job %s for %s", name, node.name)
                created.append(name)
        return created

    def run(self) -> int:
        log.info("run %s: %d stages", self.cfg.release, len(self.nodes))
        last = None
        errors = 0
        while True:
            try:
                result = self.step()
                errors = 0
            except BadInput:
                raise
            except Exception as e:  # an API server or object store restarting: retry, then let the Job retry us
                errors += 1
                if errors > MAX_CONSECUTIVE_ERRORS:
                    raise
                log.warning("reconcile pass failed (%s: %s); retrying", type(e).__name__, e)
                time.sleep(self.cfg.poll_seconds)
                continue
            summary = _summary(result.states)
            if summary != last:
                log.info("stages: %s", summary)
                last = summary
            if result.failed:
                for name, st in result.failed.items():
                    log.error("stage %s failed: %s", name, st.reason)
                name, st = next(iter(result.failed.items()))
                reason = f"stage {name}: {st.reason}"
                if self.cfg.controller_job:
                    self.cluster.end_job(self.cfg.controller_job, {jobspec.ANN_FAILURE: reason[:1000]})
                    self.ended = True
                raise BadInput(f"run {self.cfg.release} failed: {reason}")
            if result.done:
                log.info("run %s complete: %d stages", self.cfg.release, len(result.states))
                return 0
            time.sleep(self.cfg.poll_seconds)


def _labels(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}


def _summary(states: dict[str, jobspec.JobState]) -> str:
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main(cfg: ControllerConfig, cluster=None) -> int:
    if cluster is None:
        from mysproj.kube.cluster import Cluster

        cluster = Cluster(namespace=cfg.namespace)
    controller = None
    try:
        controller = Controller(cfg, cluster)
        return controller.run()
    except BadInput as e:
        log.error("%s", e)
        print(f"error: {redact(e)}", flush=True)
        if cfg.controller_job and not getattr(controller, "ended", False):
            # Bad values or config (found before any stage ran): end our own Job now, with the reason, as a stage
            # failure does; servers without podFailurePolicy (1.20) would otherwise restart us with backoff.
            try:
                reason = f"bad input (exit {EXIT_BAD_INPUT}): {redact(e)}"
                cluster.end_job(cfg.controller_job, {jobspec.ANN_FAILURE: reason[:1000]})
            except Exception as end_error:  # noqa: BLE001 - the exit code still says it; the Job retries at worst
                log.warning("could not end Job %s: %s", cfg.controller_job, end_error)
        return EXIT_BAD_INPUT
