"""Fine-tuning checkpoints under `<out>/checkpoints/step-<N>/`, each committed by its own `_SUCCESS.json`.

A checkpoint holds what a restarted job needs to continue exactly where it stopped: the trainable weights and
optimizer state (`trainable.safetensors` + `optimizer.pt`, or DeepSpeed's own shards under `ds/` with frozen
weights excluded), every rank's RNG state, and `state.json` (step, metrics so far). The learning-rate schedule and
the data order are pure functions of the step and are recomputed. Ranks write into a node-local folder; each
node's first rank uploads its files and rank 0 writes the manifest once all of them are up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.manifest import MANIFEST, StageInput, StageOutput, sha256_file

log = logging.getLogger(__name__)
STAGE = "finetune-checkpoint"
_STEP = re.compile(r"^step-(\d+)$")


def step_uri(out_uri: str, step: int) -> str:
    return U.join(out_uri, "checkpoints", f"step-{step}")


def complete_steps(out_uri: str, cfg, inputs: dict, *, report: bool = False) -> list[int]:
    """Steps with a committed checkpoint of this same config and `inputs` (the run's input digests,
    `StageOutput.inputs` of its output: digested once per run, not once per checkpoint), ascending. `report` (one
    process of a run, at its start) logs one line for each checkpoint that does not count, and removes the
    half-written ones (no manifest), which no run can resume from."""
    steps = []
    for name in U.list_dirs(U.join(out_uri, "checkpoints")):
        m = _STEP.match(name)
        if not m:
            continue
        ckpt = StageOutput(U.join(out_uri, "checkpoints", name), STAGE, cfg, inputs=inputs)
        if ckpt.existing():
            steps.append(int(m.group(1)))
        elif report and ckpt.reason:
            log.warning("finetune: ignoring checkpoint %s: %s", name, ckpt.reason)
        elif report:
            log.warning("finetune: discarding half-written checkpoint %s (no %s: the run stopped while writing "
                        "it)", name, MANIFEST)
            U.remove(ckpt.uri, recursive=True)
    return sorted(steps)


def local_dir(out_uri: str, step: int) -> str:
    """A node-local scratch folder, the same path on every rank (DeepSpeed needs one save_dir)."""
    key = config_key(out_uri)
    return os.path.join(cache.cache_dir(), "checkpoints", key, f"step-{step}")


def config_key(out_uri: str) -> str:
    return hashlib.sha256(out_uri.encode()).hexdigest()[:16]


def save(ctx, step: int, state: dict, inputs: dict) -> None:
    """Write checkpoint `step` (all ranks call this), recording the run's input digests `inputs`."""
    acc = ctx.accelerator
    target = step_uri(ctx.cfg.out, step)
    # A local output is written in place: a 7B ZeRO-3 checkpoint holds fp32 weights and Adam state, too large
    # for a second copy on the disk.
    in_place = U.is_local(target)
    local = U.local_path(target) if in_place else local_dir(ctx.cfg.out, step)
    if acc.is_local_main_process:
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
    acc.wait_for_everyone()

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(local, f"rng-rank{acc.process_index}.pt"))
    if ctx.deepspeed:
        ctx.model.save_checkpoint(local, tag="ds", exclude_frozen_parameters=True, save_latest=False)
    elif acc.is_main_process:
        trainable = {n: p.detach().cpu().contiguous() for n, p in ctx.unwrapped.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(local, "trainable.safetensors"))
        torch.save({"optimizer": ctx.optimizer.state_dict()}, os.path.join(local, "optimizer.pt"))
    if acc.is_main_process:
        with open(os.path.join(local, "state.json"), "w") as f:
            json.dump(state, f)
    acc.wait_for_everyone()
    records = {}
    if acc.is_local_main_process:
        for root, _, names in os.walk(local):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, local).replace(os.sep, "/")
                if rel == MANIFEST:
                    continue
                if not in_place:
                    U.put_file(full, U.join(target, rel))
                records[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}

    gathered = gather_object([records]) if acc.num_processes > 1 else [records]
    if acc.is_main_process:
        out = StageOutput(target, STAGE, ctx.cfg, inputs=inputs)
        for r in gathered:
            out.files.update(r)
        out.commit({"step": step})
        log.info("finetune: checkpoint step %d -> %s", step, target)
    acc.wait_for_everyone()
    if acc.is_local_main_process and not in_place:
        shutil.rmtree(local, ignore_errors=True)


def prune(out_uri: str, cfg, keep: int, inputs: dict) -> None:
    """Keep the newest `keep` complete checkpoints (of the run's `inputs`); drop older ones and half-written
    leftovers."""
    done = complete_steps(out_uri, cfg, inputs)
    keep_steps = set(done[-keep:])
    newest = max(done) if done else -1
    for name in U.list_dirs(U.join(out_uri, "checkpoints")):
        m = _STEP.match(name)
        if not m:
            continue
        step = int(m.group(1))
        if step not in keep_steps and step <= newest:
            U.remove(U.join(out_uri, "checkpoints", name), recursive=True)


def load(ctx, step: int) -> dict:
    """Restore checkpoint `step` into the prepared model/optimizer; returns its state.json."""

    acc = ctx.accelerator
    src = StageInput(step_uri(ctx.cfg.out, step), expect_stage=STAGE)
    in_place = U.is_local(src.uri)
    local = U.local_path(src.uri) if in_place else local_dir(ctx.cfg.out, step)
    if acc.is_local_main_process:
        if not in_place:
            shutil.rmtree(local, ignore_errors=True)
        for name in src.files:  # verified against the manifest (in place for a local output)
            path = src.local_path(name)
            if not in_place:
                dest = os.path.join(local, name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(path, dest)
    acc.wait_for_everyone()
    if ctx.deepspeed:
        ctx.model.load_checkpoint(local, tag="ds", load_module_strict=False, load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    else:
        trainable = load_file(os.path.join(local, "trainable.safetensors"))
        params = dict(ctx.unwrapped.named_parameters())
        with torch.no_grad():
            for name, t in trainable.items():
                params[name].copy_(t)
        opt = torch.load(os.path.join(local, "optimizer.pt"), map_location="cpu", weights_only=True)
        ctx.optimizer.load_state_dict(opt["optimizer"])
    rng_file = os.path.join(local, f"rng-rank{acc.process_index}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(local, "state.json")) as f:
        state = json.load(f)
    acc.wait_for_everyone()
    if acc.is_local_main_process and not in_place:
        shutil.rmtree(local, ignore_errors=True)
    return state


__all__ = ["save", "load", "prune", "complete_steps", "step_uri", "MANIFEST"]
