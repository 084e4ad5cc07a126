"""From a DAG node to a stage Job, and from a Job (and its pods) back to a stage state.

The chart renders one Job template per pod kind (cpu, gpu, finetune) into the release's ConfigMap; this module
fills in what only the DAG knows: a deterministic name, the owner, the stage labels, the entry point and the
stage config as `MYSPROJ_<FIELD>` env vars (the stage dataclass's field names: the single source).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

from mysproj.config.fields import config_hash, env_name
from mysproj.errors import EXIT_BAD_INPUT
from mysproj.pipeline.dag import Node
from mysproj.process import FAILURE_RECORD  # noqa: F401 - runstate reads it as jobspec.FAILURE_RECORD

MAX_JOB_NAME = 52  # pods get "<job>-<5 chars>"; hostnames and the `job-name` label stay within 63
LABEL_RUN = "mysproj.io/run"
LABEL_STAGE = "mysproj.io/stage"
LABEL_GPU = "mysproj.io/gpu"
LABEL_RANK = "mysproj.io/rank"
ANN_NODE = "mysproj.io/node"
ANN_HASH = "mysproj.io/config-hash"
ANN_FAILURE = "mysproj.io/failure"


def entry_args(stage: str) -> list[str]:
    """The stage container's args after the chart's `command: [python, -u]` (the images' WORKDIR holds jobs/)."""
    return ["jobs/stage.py", stage]


TEMPLATE_KINDS = ("cpu", "gpu", "finetune", "fetch")
GPU_KINDS = ("gpu", "finetune")  # the kinds that hold GPUs


def template_kind(node: Node) -> str:
    """finetune (torchrun layout), gpu (the GPU image and pool), fetch (the pods that reach the internet, with the
    hub and Kaggle tokens: the GPU image, whose torch converts pickled weights, on the CPU pool) or cpu (the slim
    image: prep, report). model-init needs torch, which only the GPU image has, so it runs there even for the small
    presets."""
    if node.stage in ("finetune", "fetch"):
        return node.stage
    return "gpu" if node.gpu or node.stage == "model-init" else "cpu"


def job_names(fullname: str, node: Node, cfg: Any, nodes_per_finetune: int = 1) -> list[str]:
    """One name per pod group: `<run words>-<node words>-<hash>[-r<rank>]`, whole words that are at most shortened
    from their ends, never cut elsewhere. The hash covers the run, the node and its config, so a changed config gets
    a new Job rather than the finished one of an older install, and names stay unique however short the words."""
    digest = hashlib.sha256(f"{fullname}\0{node.name}\0{config_hash(cfg)}".encode()).hexdigest()[:8]
    ranks = range(nodes_per_finetune) if node.stage == "finetune" and nodes_per_finetune > 1 else [None]
    suffixes = [f"-{digest}" + (f"-r{rank}" if rank is not None else "") for rank in ranks]
    # The chart's own name says nothing in a listing of one run's Jobs (its labels carry it).
    run = _fit([w for w in _dns(fullname).split("-") if w != "mysproj"] or [_dns(fullname)], MAX_RUN_WORDS)
    slug = node.name
    for long, short in _SHORT:
        slug = slug.replace(long, short)
    room = MAX_JOB_NAME - len(run) - 1 - max(len(s) for s in suffixes)
    return [f"{run}-{_fit(_dns(slug).split('-'), room, keep_end=True)}{s}" for s in suffixes]


MAX_RUN_WORDS = 20  # the run's part of a stage Job name: the same in all of the run's Job names
_SHORT = (("zero-shot", "zs"), ("ft-projector", "proj"), ("ft-full", "full"), ("ft-lora", "lora"),
          ("textures-mini", "texmini"), ("/seed", "/s"))


def _fit(words: list[str], room: int, keep_end: bool = False) -> str:
    """`words` joined by '-' in at most `room` characters: each word shortened from its end as far as needed (8, 6,
    4, then 3 letters), then whole words dropped (from the start with `keep_end`: the end of a node name, such as
    `s0-finetune`, tells the most)."""
    for limit in (None, 8, 6, 4, 3):
        short = [w[:limit] for w in words]
        if len("-".join(short)) <= room:
            return "-".join(short)
    while len(short) > 1 and len("-".join(short)) > room:
        short = short[1:] if keep_end else short[:-1]
    return "-".join(short)[:room].strip("-")


def _dns(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def env_value(value: Any) -> str:
    """Encode a config value the way `load_config` decodes `MYSPROJ_<FIELD>`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(env_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def config_env(cfg: Any) -> list[dict]:
    return [{"name": env_name(f.name), "value": env_value(getattr(cfg, f.name))} for f in dataclasses.fields(cfg)]


def stage_job(template: dict, *, name: str, node: Node, cfg: Any, owner: dict | None, gpu: bool,
              rank: int | None = None, nnodes: int = 1, master: str | None = None) -> dict:
    job = copy.deepcopy(template)
    meta = job.setdefault("metadata", {})
    meta["name"] = name
    stage_labels = {LABEL_STAGE: node.stage, LABEL_GPU: str(gpu).lower()}
    if rank is not None:
        stage_labels[LABEL_RANK] = str(rank)
    meta.setdefault("labels", {}).update(stage_labels)
    meta.setdefault("annotations", {}).update({ANN_NODE: node.name, ANN_HASH: config_hash(cfg)})
    if owner:
        meta["ownerReferences"] = [owner]
    pod = job["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(stage_labels)
    pod["metadata"].setdefault("annotations", {})[ANN_NODE] = node.name
    container = pod["spec"]["containers"][0]
    container["args"] = entry_args(node.stage)
    env = container.setdefault("env", [])
    env.extend(config_env(cfg))
    env.extend([{"name": "MYSPROJ_JOB_NAME", "value": name}, {"name": "MYSPROJ_NODE", "value": node.name}])
    if rank is not None:
        # Rank 0's pod is reachable as <hostname>.<headless service>; the others wait for that name to resolve.
        pod["spec"]["hostname"] = name
        if master:
            pod["spec"]["subdomain"] = master.split(".", 1)[1].split(".", 1)[0]
        env.extend([{"name": "NNODES", "value": str(nnodes)}, {"name": "NODE_RANK", "value": str(rank)},
                    {"name": "MASTER_ADDR", "value": master or "localhost"}])
    return job


def owner_reference(job: dict) -> dict:
    """Every stage Job is owned by the controller Job, so deleting the release deletes them (garbage collector)."""
    return {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"], "blockOwnerDeletion": True}


# -- state ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class JobState:
    state: str                 # waiting | pending | running | complete | reused | failed
    reason: str = ""           # why it failed (or the last retryable failure while it is still retrying)
    final: bool = False        # a failure retrying cannot fix
    start: str | None = None
    end: str | None = None
    attempts: int = 0


def _condition(job: dict, kind: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def terminated_exit_codes(pod: dict) -> list[int]:
    codes = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term and term.get("exitCode") is not None:
            codes.append(int(term["exitCode"]))
    return codes


def _termination_message(pod: dict) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        msg = (term.get("message") or "").strip()
        if msg:
            return msg.splitlines()[-1]
    return ""


# A kubelet retries these forever and the Job never fails: the stage is failed for good at once where no retry can
# help (the image is not on the node and may not be pulled, or its name is invalid), and after a grace period where
# a registry might still answer.
IMAGE_ERRORS_FINAL = ("ErrImageNeverPull", "InvalidImageName")
IMAGE_PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff")
IMAGE_PULL_GRACE_SECONDS = 300
_STARTING = ("ContainerCreating", "PodInitializing")


def _image_problem(pod: dict, now: datetime) -> str:
    """Why the pod's image cannot run, once that is final; else ""."""
    created = (pod.get("metadata") or {}).get("creationTimestamp")
    stuck = 0.0
    if created:
        stuck = (now - datetime.fromisoformat(str(created).replace("Z", "+00:00"))).total_seconds()
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason") or ""
        if reason in IMAGE_ERRORS_FINAL or (reason in IMAGE_PULL_ERRORS and stuck > IMAGE_PULL_GRACE_SECONDS):
            return f"image {cs.get('image', '')}: {reason}" + (f": {waiting['message']}" if waiting.get("message")
                                                                 else "")
    return ""


def classify(job: dict, pods: list[dict], failure_record: dict | None = None,
             now: datetime | None = None) -> JobState:
    """State of one stage Job. Exit code 64 (bad input) is final even where the server ignores podFailurePolicy
    (1.20): the controller reads it from the pods or, where the node reports no exit code, from the failure record
    the stage's entry point wrote for this very Job. A pod whose image cannot be had is final too."""
    status = job.get("status") or {}
    st = JobState("pending", start=status.get("startTime"), end=status.get("completionTime"),
                  attempts=int(status.get("failed") or 0) + int(status.get("succeeded") or 0)
                  + int(status.get("active") or 0))
    name = job["metadata"]["name"]
    record = failure_record if failure_record and failure_record.get("job") == name else None
    annotated = ((job.get("metadata") or {}).get("annotations") or {}).get(ANN_FAILURE)
    if _condition(job, "Complete") or int(status.get("succeeded") or 0) > 0:
        st.state = "complete"
        return st
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    bad_input = any(EXIT_BAD_INPUT in terminated_exit_codes(p) for p in failed_pods)
    if not bad_input and record and record.get("exit_code") == EXIT_BAD_INPUT and failed_pods:
        bad_input = True
    reason = (record or {}).get("error") or next((m for m in map(_termination_message, failed_pods) if m), "")
    failed_cond = _condition(job, "Failed")
    now = now or datetime.now(timezone.utc)
    image = next((m for m in (_image_problem(p, now) for p in pods) if m), "")
    if annotated or bad_input or failed_cond or image:
        st.state, st.final = "failed", True
        st.end = st.end or (failed_cond or {}).get("lastTransitionTime")
        if annotated:
            st.reason = annotated
        elif image:
            st.reason = image
        elif bad_input:
            st.reason = f"bad input (exit {EXIT_BAD_INPUT})" + (f": {reason}" if reason else "")
        else:
            why = failed_cond.get("message") or failed_cond.get("reason") or "failed"
            st.reason = f"{why}: {reason}" if reason else why
        return st
    if int(status.get("active") or 0) > 0:
        st.state = "running"
    waiting = [w for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or []
               if (w := (cs.get("state") or {}).get("waiting") or {}).get("reason") not in (None, *_STARTING)]
    if waiting:  # e.g. a Secret not there yet, or an image pull a registry may still answer
        st.reason = f"waiting: {waiting[0]['reason']}" + (f": {waiting[0]['message']}" if waiting[0].get("message")
                                                          else "")
    if failed_pods:
        codes = [c for p in failed_pods for c in terminated_exit_codes(p)]
        st.reason = f"retrying after {len(failed_pods)} failed attempt(s)" + (f" (exit {codes[-1]})" if codes else "")
    return st


def combine(states: list[JobState]) -> JobState:
    """One node's state from its Jobs (several for multi-node fine-tuning: all ranks must finish)."""
    if len(states) == 1:
        return states[0]
    for s in states:
        if s.state == "failed":
            return s
    if all(s.state == "complete" for s in states):
        return JobState("complete", start=min(s.start or "~" for s in states),
                        end=max(s.end or "" for s in states) or None)
    state = "running" if any(s.state == "running" for s in states) else "pending"
    return JobState(state, start=min((s.start for s in states if s.start), default=None),
                    reason="; ".join(s.reason for s in states if s.reason))
