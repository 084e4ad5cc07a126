"""The pipeline controller: runs the DAG of `mysproj.pipeline.dag` as one Kubernetes Job per stage.

It runs as a Job itself (jobs/controller.py, slim CPU image), one per Helm revision, and keeps no state of its own:
every pass reads the run's state with `mysproj.kube.runstate` (the stage Jobs, and for nodes without one the stage
output's manifest in object storage), the same reader `mysproj status` uses. So a killed and restarted controller,
a re-install of the same values or a `helm upgrade` with changed ones picks up where the run stopped, and a stage
whose output is already complete with the same config is not run again.

Each pass: a node whose dependencies are complete gets its Job(s) created from the chart's template (owned by the
controller Job, so `helm uninstall` removes them), GPU Jobs up to `max_parallel_gpu_jobs`. A Job that fails for
good (bad-input exit 64, or its backoffLimit spent) fails the run with its reason: the controller exits 64.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import yaml

from mysproj.config.fields import load_config, opt
from mysproj.errors import EXIT_BAD_INPUT, BadInput, redact
from mysproj.kube import jobspec, runstate
from mysproj.kube.cluster import Cluster
from mysproj.kube.events import EventRecorder
from mysproj.pipeline import dag
from mysproj.stages.registry import node_configs
from mysproj.tracking.mlflow_log import parent_run

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_ERRORS = 30
PARENT_RETRY_SECONDS = 30  # how often the controller asks MLflow again for the parent run while it does not answer


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


def read_pipeline(cluster, configmap: str) -> tuple[dag.PipelineConfig, dict[str, dict]]:
    data = cluster.read_configmap(configmap).get("data") or {}
    if "pipeline.yaml" not in data:
        raise BadInput(f"ConfigMap {configmap} has no pipeline.yaml; install the run with the mysproj chart")
    values = yaml.safe_load(data["pipeline.yaml"]) or {}
    pipeline = load_config(dag.PipelineConfig, overrides=values, env={})
    templates = {k: yaml.safe_load(data[f"job-{k}.yaml"]) for k in jobspec.TEMPLATE_KINDS
                 if f"job-{k}.yaml" in data}
    return pipeline, templates


@dataclass
class PassResult:
    states: dict[str, jobspec.JobState]
    created: list[str]
    superseded: bool = False  # a newer revision's controller runs this release now

    @property
    def failed(self) -> dict[str, jobspec.JobState]:
        return {n: s for n, s in self.states.items() if s.state == "failed" and s.final}

    @property
    def done(self) -> bool:
        return all(s.state in runstate.FINISHED for s in self.states.values())


class Controller:
    def __init__(self, cfg: ControllerConfig, cluster):
        self.cfg = cfg
        self.cluster = cluster
        pipeline, self.templates = read_pipeline(cluster, cfg.configmap)
        self.nodes = dag.build(pipeline)
        # Every stage config is validated before any Job exists: a typo fails in seconds, not after training.
        self.configs = node_configs(self.nodes)
        missing = {jobspec.template_kind(n) for n in self.nodes} - set(self.templates)
        if missing:
            raise BadInput(f"ConfigMap {cfg.configmap} lacks the job template(s) {sorted(missing)}")
        own_job = cluster.read_job(cfg.controller_job) if cfg.controller_job else None
        self.owner = jobspec.owner_reference(own_job) if own_job else None
        # The run's story as Kubernetes Events on this Job (`kubectl describe job`), where there is one.
        self.events = EventRecorder(cluster, own_job, cfg.release) if own_job else None
        # MLflow's parent run with the release's tags, made before stage Jobs start side by side. Where the server
        # does not answer, later passes try again: a stage that logs meanwhile makes the parent without them.
        self._parent = ((pipeline.tracking["mlflow_uri"], pipeline.tracking.get("mlflow_experiment") or "mysproj",
                         pipeline.root.rstrip("/"), {"mysproj.recipe": pipeline.recipe, "mysproj.release": cfg.release})
                        if pipeline.tracking.get("mlflow_uri") else None)
        self._parent_tried: float | None = None
        self._tracking_parent()
        self.names = {n.name: jobspec.job_names(cfg.fullname, n, self.configs[n.name], cfg.finetune_nodes)
                      for n in self.nodes}
        # (node, config hash) -> manifest, positive checks only: a cache, never the source of truth
        self._complete: dict[tuple[str, str], dict] = {}
        self._live_pods: dict[str, tuple[str, str]] = {}  # pod -> (Job, phase) of unfinished pods seen last pass
        self._recorded: set[str] = set()  # pods already recorded as replaced
        self.ended = False  # this controller's own Job was ended with a failure reason

    def _tracking_parent(self) -> None:
        if self._parent is None or (self._parent_tried is not None
                                    and time.monotonic() - self._parent_tried < PARENT_RETRY_SECONDS):
            return
        first = self._parent_tried is None
        self._parent_tried = time.monotonic()
        error = parent_run(*self._parent)
        if error is None:
            if not first:
                log.info("mlflow: parent run of %s made", self._parent[2])
            self._parent = None
        elif first:
            log.warning("mlflow: %s did not answer (%s); the run goes on, trying again every %d s",
                        redact(self._parent[0]), error, PARENT_RETRY_SECONDS)

    def step(self) -> PassResult:
        self._tracking_parent()
        run = runstate.read(self.cluster, self.cfg.release, self.nodes, self.configs,
                            controller_job=self.cfg.controller_job, complete=self._complete)
        if run.superseded:
            return PassResult({n: s.state for n, s in run.stages.items()}, [], superseded=True)
        self._record_replaced_pods(run)
        gpu_running = sum(1 for s in run.stages.values() for j, js in zip(s.jobs, s.job_states)
                          if runstate.labels_of(j).get(jobspec.LABEL_GPU) == "true"
                          and js.state in ("pending", "running"))
        states: dict[str, jobspec.JobState] = {}
        created: list[str] = []
        created_by_node: dict[str, list[str]] = {}
        for name, st in run.stages.items():
            states[name] = st.state
            if not st.ready:
                continue
            gpu = jobspec.template_kind(st.node) in jobspec.GPU_KINDS
            if gpu and self.cfg.max_parallel_gpu_jobs and gpu_running >= self.cfg.max_parallel_gpu_jobs:
                states[name] = jobspec.JobState("waiting", reason="GPU job cap reached")
                continue
            made = self._create(st.node, st.cfg)
            created.extend(made)
            if made:
                created_by_node[name] = made
            gpu_running += len(self.names[name]) if gpu else 0
            # Not created while an earlier revision's Job holds the name: a later pass creates it.
            states[name] = jobspec.JobState("pending") if made else st.state
        for st in run.failed().values():
            for job in st.jobs:
                if jobspec.ANN_FAILURE not in (job["metadata"].get("annotations") or {}):
                    # Stops 1.20 servers (no podFailurePolicy) from retrying a bad input; keeps the reason.
                    self.cluster.stop_job(job["metadata"]["name"], {jobspec.ANN_FAILURE: st.state.reason[:1000]})
        if self.events is not None:
            self.events.observe(run, created_by_node)
        return PassResult(states, created)

    def _record_replaced_pods(self, run: runstate.RunState) -> None:
        """Note on its Job each pod deleted before it finished (seen being deleted, or gone since the last pass while
        it ran): the Job replaces it and keeps no count of it, so `mysproj status` shows this one."""
        live: dict[str, tuple[str, str]] = {}
        for st in run.stages.values():
            for job, js in zip(st.jobs, st.job_states):
                name = job["metadata"]["name"]
                pods = run.pods.get(name, [])
                new = runstate.being_replaced(job, pods, js)
                present = {p["metadata"]["name"] for p in pods}
                if js.state in ("pending", "running"):
                    new += [(pod, f"pod {pod} disappeared while {phase}") for pod, (owner, phase)
                            in self._live_pods.items() if owner == name and pod not in present]
                ann = job["metadata"].get("annotations") or {}
                last = ann.get(runstate.ANN_LAST_REPLACED, "")
                new = [(pod, what) for pod, what in new if pod not in self._recorded and f"pod {pod} " not in last]
                if new:
                    count = int(ann.get(runstate.ANN_REPLACED, "0") or 0) + len(new)
                    log.warning("stage %s: %s; the Job replaces it", st.node.name, new[-1][1])
                    self.cluster.annotate_job(name, {runstate.ANN_REPLACED: str(count),
                                                     runstate.ANN_LAST_REPLACED: new[-1][1][:500]})
                    self._recorded.update(pod for pod, _ in new)
                for p in pods:
                    phase = (p.get("status") or {}).get("phase") or "Pending"
                    if phase not in ("Succeeded", "Failed") and not p["metadata"].get("deletionTimestamp"):
                        live[p["metadata"]["name"]] = (name, phase)
        self._live_pods = live

    def _create(self, node: dag.Node, cfg: Any) -> list[str]:
        names = self.names[node.name]
        kind = jobspec.template_kind(node)
        multi = len(names) > 1
        master = f"{names[0]}.{self.cfg.finetune_service}" if multi and self.cfg.finetune_service else None
        created = []
        for rank, name in enumerate(names):
            body = jobspec.stage_job(self.templates[kind], name=name, node=node, cfg=cfg, owner=self.owner,
                                     gpu=kind in jobspec.GPU_KINDS, rank=rank if multi else None, nnodes=len(names),
                                     master=master)
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
            if result.superseded:
                log.info("run %s: a newer revision's controller took over; stopping", self.cfg.release)
                return 0
            summary = _summary(result.states)
            if summary != last:
                log.info("stages: %s", summary)
                last = summary
            if result.failed:
                for name, st in result.failed.items():
                    log.error("stage %s failed: %s", name, st.reason)
                name, st = next(iter(result.failed.items()))
                reason = f"stage {name}: {st.reason}"
                if self.events is not None:
                    self.events.run_failed(reason)
                if self.cfg.controller_job:
                    self.cluster.end_job(self.cfg.controller_job, {jobspec.ANN_FAILURE: reason[:1000]})
                    self.ended = True
                raise BadInput(f"run {self.cfg.release} failed: {reason}")
            if result.done:
                log.info("run %s complete: %d stages", self.cfg.release, len(result.states))
                if self.events is not None:
                    self.events.run_done(len(result.states))
                return 0
            time.sleep(self.cfg.poll_seconds)


def _summary(states: dict[str, jobspec.JobState]) -> str:
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main(cfg: ControllerConfig, cluster=None) -> int:
    if cluster is None:
        cluster = Cluster(namespace=cfg.namespace)
    controller = None
    try:
        controller = Controller(cfg, cluster)
        return controller.run()
    except BadInput as e:  # the process contract prints it and exits 64 (jobs/controller.py)
        if cfg.controller_job and not getattr(controller, "ended", False):
            # Bad values or config (found before any stage ran): end our own Job now, with the reason, as a stage
            # failure does; servers without podFailurePolicy (1.20) would otherwise restart us with backoff.
            try:
                reason = f"bad input (exit {EXIT_BAD_INPUT}): {redact(e)}"
                cluster.end_job(cfg.controller_job, {jobspec.ANN_FAILURE: reason[:1000]})
            except Exception as end_error:  # noqa: BLE001 - the exit code still says it; the Job retries at worst
                log.warning("could not end Job %s: %s", cfg.controller_job, end_error)
        raise
