"""The fine-tuning loop: one code path for a CPU process, one GPU, and torchrun on many GPUs/nodes (accelerate, with
DeepSpeed ZeRO on GPUs when distributed).

Loss (`loss_normalization`): by default the HF Trainer's, as the released scripts trained: each micro-batch's mean token
cross-entropy over its answer tokens, averaged over the micro-batches of every process and accumulation step; or
the mean over the answer tokens of the whole global batch (every rank computes the step's target-token count from
the data order, so gradient accumulation and the number of GPUs do not change the result).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from mysproj.config.stages import DEFAULT_GLOBAL_BATCH
from mysproj.data.prepared import PreparedData
from mysproj.errors import worker_errors
from mysproj.models.loading import load_llava
from mysproj.models.processors import with_backend
from mysproj.storage import uri as U
from mysproj.storage.stage_time import processed
from mysproj.tracking import runs
from mysproj.tracking.tensorboard import EventLog
from mysproj.training import checkpoint, memory_fit, preemption, session
from mysproj.training.data import MicroBatches, Schedule, TrainSet, collate, load_examples
from mysproj.training.export import export

log = logging.getLogger("mysproj.finetune")


def default_micro_batch(global_batch: int, world: int, requested: int | None, cap: int = 16) -> int:
    if requested:
        return requested
    per_rank = max(1, global_batch // world)
    b = min(cap, per_rank)
    while per_rank % b:
        b -= 1
    return b


def step_scalars(loss: float, lr: float, grad_norm: float | None, samples_per_s: float, cuda: bool) -> dict:
    """TensorBoard's points of one optimizer step (the names the HF Trainer's TensorBoard logs use, under train/)."""
    values = {"train/loss": loss, "train/learning_rate": lr, "train/grad_norm": grad_norm,
              "train/samples_per_s": samples_per_s}
    if cuda:
        values["train/gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return {k: v for k, v in values.items() if v is not None}


def tensorboard_log(cfg, points: list):
    if not cfg.tensorboard:
        return None

    return EventLog(cfg.out, [tuple(p) for p in points])


def tracking_runs(cfg, points: list) -> dict:
    """The output's MLflow / W&B runs (those its config names) with the points a resumed run's checkpoint kept."""

    found = runs(cfg, "finetune")
    for run in found.values():
        for step, wall, values in points:
            run.metrics(step, values, wall)
    return found


@dataclass
class _Run:
    """What the parts of one fine-tuning run share: the set-up, the data, and the progress so far."""

    cfg: Any
    out: Any                  # the stage output (its `inputs` key the checkpoints)
    ctx: session.Session
    loaded: Any               # models.loading.LoadedLlava
    base_dtype: Any
    examples: list
    schedule: Schedule
    global_batch: int
    micro: int
    world: int
    cuda: bool
    bf16: bool
    start: int = 0
    resumed_from: int | None = None
    metrics: list = field(default_factory=list)  # the logged steps (metrics.jsonl)
    points: list = field(default_factory=list)   # every step's scalars [step, wall time, values]
    events: Any = None                           # the TensorBoard event log (main process, where on)
    tracked: dict = field(default_factory=dict)  # MLflow / W&B runs (main process)


def train(cfg, out) -> dict:
    """Fine-tune as `cfg` says, resuming from the newest complete checkpoint; returns the manifest summary."""
    run = _prepare(cfg, out)
    _resume(run)
    _log_start(run)
    _steps(run)
    return _finish(run)


def _prepare(cfg, out) -> _Run:
    """The model loaded, the examples and the step schedule, and the session set up on them."""

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = cfg.global_batch or DEFAULT_GLOBAL_BATCH[cfg.strategy]
    micro = default_micro_batch(global_batch, world, cfg.per_device_batch, cfg.max_micro_batch)
    bf16 = session.uses_bf16(cfg, cuda)
    if cuda:  # the memory check from the model's config.json before any weight is read (again once loaded)
        counts = memory_fit.model_params(cfg.model)
        if counts:
            memory_fit.check(memory_fit.plan(
                trainable=counts[0], total=counts[1], gpu_bytes=torch.cuda.get_device_properties(0).total_memory,
                host=memory_fit.host_memory(), world=world, strategy=cfg.strategy, requested=cfg.deepspeed,
                cuda=True))
    data = PreparedData(cfg.data)
    loaded = load_llava(cfg.model, device="cpu", dtype=torch.bfloat16 if bf16 else torch.float32)
    model = loaded.model
    base_dtype = model.get_input_embeddings().weight.dtype
    examples = load_examples(data, loaded.tokenizer, model.config, conv=cfg.conv, max_length=cfg.model_max_length)
    schedule = Schedule(len(examples), global_batch, micro, world, cfg.epochs, cfg.max_steps, fill=cfg.fill,
                        lengths=tuple(e.words for e in examples) if cfg.group_by_length else None)
    schedule.check()
    ctx = session.build(cfg, model, world=world, micro=micro, accumulation=schedule.accumulation,
                        total_steps=schedule.total_steps)
    return _Run(cfg, out, ctx, loaded, base_dtype, examples, schedule, global_batch, micro, world, cuda, bf16)


def _resume(run: _Run) -> None:
    """Continue from the newest complete checkpoint, if any: its step, metrics and scalars, the schedule at it."""
    cfg, acc = run.cfg, run.ctx.accelerator
    done = checkpoint.complete_steps(cfg.out, cfg, run.out.inputs, report=acc.is_main_process)
    if not done:
        return
    state = checkpoint.load(run.ctx, done[-1])
    run.start, run.metrics, run.resumed_from = state["step"], state["metrics"], done[-1]
    run.points = [p for p in state.get("scalars", []) if p[0] <= run.start]
    with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(run.start):
            run.ctx.scheduler.step()
    log.info("finetune: resumed from checkpoint step %d of %d", run.start, run.schedule.total_steps)


def _log_start(run: _Run) -> None:
    cfg, ctx = run.cfg, run.ctx
    if not ctx.accelerator.is_main_process:
        return
    log.info("finetune: %s on %d examples, %d steps of %d (%d per device x %d processes x %d accumulation), lr %g, "
             "%s, deepspeed %s, shared prefix %s, %.1fM trainable", cfg.strategy, len(run.examples),
             run.schedule.total_steps, run.global_batch, run.micro, run.world, run.schedule.accumulation,
             ctx.rates.lr, "bf16" if run.bf16 else "fp32", ctx.deepspeed or "off",
             "on" if ctx.shared is not None else "off", ctx.n_trainable / 1e6)
    if ctx.plan is not None and ctx.plan.gpu_bytes:  # GPU runs
        log.info("finetune: memory: %s", ctx.plan.describe())


def _loader(run: _Run):
    cfg = run.cfg
    return torch.utils.data.DataLoader(
        TrainSet(run.examples, with_backend(run.loaded.image_processor, cfg.image_backend), cfg.image_aspect_ratio),
        batch_sampler=MicroBatches(run.schedule, cfg.seed, run.ctx.accelerator.process_index, run.start),
        collate_fn=collate(run.loaded.tokenizer.pad_token_id), num_workers=cfg.workers, pin_memory=run.cuda,
        generator=torch.Generator())  # its own generator: the global RNG (dropout) is left untouched


def _steps(run: _Run) -> None:
    """The optimizer steps from `run.start` on: each one logged, tracked and checkpointed as the config says."""
    cfg, ctx, schedule = run.cfg, run.ctx, run.schedule
    acc, total = ctx.accelerator, schedule.total_steps
    batches = worker_errors(_loader(run))
    t0, seen = time.monotonic(), 0
    # TensorBoard: the per-step points kept in each checkpoint rebuild the event file on resume (no step twice).
    run.events = tensorboard_log(cfg, run.points) if acc.is_main_process else None
    run.tracked = tracking_runs(cfg, run.points) if acc.is_main_process else {}

    def save_before_stopping(n: int) -> bool:
        if cfg.save_checkpoints and n % cfg.checkpoint_every:
            _save(run, n)
        return cfg.save_checkpoints

    for step in preemption.StopOnSigterm(acc).steps(run.start, total, save_before_stopping):
        samples = schedule.step_samples(cfg.seed, step)
        targets = sum(run.examples[i].n_targets for i, counts in samples if counts)
        micro_batches = [next(batches) for _ in range(schedule.accumulation)]
        current_lr = ctx.scheduler.get_last_lr()[0]
        loss = acc.reduce(ctx.step(micro_batches, targets), reduction="sum").item()
        seen += sum(1 for _, counts in samples if counts)
        n = step + 1
        elapsed = time.monotonic() - t0
        rate = seen / max(elapsed, 1e-9)
        _record(run, n, step_scalars(loss, current_lr, ctx.grad_norm, rate, run.cuda))
        if n % cfg.log_every == 0 or n == total:
            eta = (total - n) * elapsed / max(n - run.start, 1)
            _log_step(run, {"step": n, "total": total, "loss": round(loss, 6), "lr": current_lr,
                            "samples_per_s": round(rate, 3), "eta_s": round(eta, 1)})
        if cfg.save_checkpoints and (n % cfg.checkpoint_every == 0 or n == total):
            _save(run, n)
    acc.wait_for_everyone()


def _record(run: _Run, n: int, values: dict) -> None:
    """One step's scalars: kept for the checkpoint, written to TensorBoard and the tracking runs."""
    run.points.append([n, time.time(), values])
    if run.events is not None:
        run.events.scalars(n, values, run.points[-1][1])
    for tracked in run.tracked.values():
        tracked.metrics(n, values, run.points[-1][1])


def _log_step(run: _Run, rec: dict) -> None:
    """A logged step: metrics.jsonl rewritten, one log line, the event file and tracking runs flushed."""
    run.metrics.append(rec)
    if not run.ctx.accelerator.is_main_process:
        return
    log.info("finetune: step %d/%d loss %.4f lr %.3g %.2f samples/s ETA %.0fs", rec["step"], rec["total"],
             rec["loss"], rec["lr"], rec["samples_per_s"], rec["eta_s"])
    U.write_text(U.join(run.cfg.out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in run.metrics))
    if run.events is not None:
        run.events.flush()
    for tracked in run.tracked.values():
        tracked.flush()


def _save(run: _Run, n: int) -> None:
    cfg = run.cfg
    checkpoint.save(run.ctx, n, {"step": n, "metrics": run.metrics, "scalars": run.points}, run.out.inputs)
    if run.ctx.accelerator.is_main_process:
        checkpoint.prune(cfg.out, cfg, cfg.keep_checkpoints, run.out.inputs)


def _finish(run: _Run) -> dict:
    """The trained weights exported and the run's summary (the manifest's)."""

    ctx = run.ctx
    ctx.release_optimizer()
    summary = export(ctx, run.out, run.loaded.tokenizer, run.loaded.image_processor, run.base_dtype, run.metrics)
    if run.events is not None:
        summary["tensorboard"] = run.events.close(run.out)
    for name, tracked in run.tracked.items():
        summary[name] = tracked.end()
    session.forget_deepspeed()
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    summary.update(_facts(run))
    return summary


def _facts(run: _Run) -> dict:
    cfg, ctx, examples, last = run.cfg, run.ctx, run.examples, (run.metrics[-1] if run.metrics else {})
    total = run.schedule.total_steps
    return dict(strategy=cfg.strategy, steps=total, resumed_from=run.resumed_from, base_model=cfg.model,
                data=cfg.data, random_weights=run.loaded.random_weights, global_batch=run.global_batch,
                per_device_batch=run.micro, accumulation=run.schedule.accumulation, world_size=run.world,
                lr=ctx.rates.lr, projector_lr=ctx.rates.projector_lr if cfg.strategy == "lora" else None,
                precision="bf16" if run.bf16 else "fp32", deepspeed=ctx.deepspeed,
                shared_prefix=ctx.shared is not None, conv=cfg.conv, examples=len(examples), fill=cfg.fill,
                group_by_length=cfg.group_by_length, tokenization_mismatches=sum(1 for e in examples if e.mismatch),
                truncated_examples=sum(1 for e in examples if e.truncated), trainable_parameters=ctx.n_trainable,
                memory_plan=ctx.plan.summary() if ctx.plan is not None and ctx.plan.gpu_bytes else None,
                final_loss=last.get("loss"), samples_per_s=last.get("samples_per_s"),
                processed=processed(total * run.global_batch, "samples", last.get("samples_per_s")))
