"""The fine-tuning loop: one code path for a CPU process, one GPU, and torchrun on many GPUs/nodes (accelerate, with
DeepSpeed ZeRO on GPUs when distributed).

Loss (`loss_normalization`): by default the HF Trainer's, as the seed scripts trained: each micro-batch's mean token
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

from mysproj.storage import uri as U
from mysproj.storage.stage_time import processed
from mysproj.training import checkpoint, memory_fit, preemption, session, strategies
from mysproj.training.data import MicroBatches, Schedule, TrainSet, collate, load_examples

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
        import torch

        values["train/gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return {k: v for k, v in values.items() if v is not None}


def tensorboard_log(cfg, points: list):
    if not cfg.tensorboard:
        return None
    from mysproj.tracking.tensorboard import EventLog

    return EventLog(cfg.out, [tuple(p) for p in points])


def tracking_runs(cfg, points: list) -> dict:
    """The output's MLflow / W&B runs (those its config names) with the points a resumed run's checkpoint kept."""
    from mysproj.tracking import runs

    found = runs(cfg, "finetune")
    for run in found.values():
        for step, wall, values in points:
            run.metrics(step, values, wall)
    return found


def train(cfg, out) -> dict:
    import torch

    from mysproj.data.prepared import PreparedData
    from mysproj.models.loading import load_llava
    from mysproj.models.processors import with_backend

    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = cfg.global_batch or strategies.DEFAULT_GLOBAL_BATCH[cfg.strategy]
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
    model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    base_dtype = model.get_input_embeddings().weight.dtype
    examples = load_examples(data, tokenizer, model.config, conv=cfg.conv, max_length=cfg.model_max_length)
    schedule = Schedule(len(examples), global_batch, micro, world, cfg.epochs, cfg.max_steps, fill=cfg.fill,
                        lengths=tuple(e.words for e in examples) if cfg.group_by_length else None)
    schedule.check()
    total = schedule.total_steps
    ctx = session.build(cfg, model, world=world, micro=micro, accumulation=schedule.accumulation,
                        total_steps=total)
    acc, scheduler, ds_name = ctx.accelerator, ctx.scheduler, ctx.deepspeed
    lr, projector_lr = strategies.learning_rates(cfg)
    n_trainable = ctx.n_trainable

    start, metrics, resumed_from, points = 0, [], None, []
    done = checkpoint.complete_steps(cfg.out, cfg, out.inputs, report=acc.is_main_process)
    if done:
        state = checkpoint.load(ctx, done[-1])
        start, metrics, resumed_from = state["step"], state["metrics"], done[-1]
        points = [p for p in state.get("scalars", []) if p[0] <= start]
        with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                scheduler.step()
        log.info("finetune: resumed from checkpoint step %d of %d", start, total)
    if acc.is_main_process:
        log.info("finetune: %s on %d examples, %d steps of %d (%d per device x %d processes x %d accumulation), lr %g, "
                 "%s, deepspeed %s, shared prefix %s, %.1fM trainable", cfg.strategy, len(examples), total,
                 global_batch, micro, world, schedule.accumulation, lr, "bf16" if bf16 else "fp32", ds_name or "off",
                 "on" if ctx.shared is not None else "off", n_trainable / 1e6)
        if ctx.plan is not None and ctx.plan.gpu_bytes:  # GPU runs
            log.info("finetune: memory: %s", ctx.plan.describe())

    loader = torch.utils.data.DataLoader(
        TrainSet(examples, with_backend(processor, cfg.image_backend), cfg.image_aspect_ratio),
        batch_sampler=MicroBatches(schedule, cfg.seed, acc.process_index, start),
        collate_fn=collate(tokenizer.pad_token_id), num_workers=cfg.workers, pin_memory=cuda,
        generator=torch.Generator())  # its own generator: the global RNG (dropout) is left untouched
    batches = iter(loader)
    t0, seen = time.monotonic(), 0
    # TensorBoard: the per-step points kept in each checkpoint rebuild the event file on resume (no step twice).
    events = tensorboard_log(cfg, points) if acc.is_main_process else None
    tracked = tracking_runs(cfg, points) if acc.is_main_process else {}

    def save(n: int) -> None:
        checkpoint.save(ctx, n, {"step": n, "metrics": metrics, "scalars": points}, out.inputs)
        if acc.is_main_process:
            checkpoint.prune(cfg.out, cfg, cfg.keep_checkpoints, out.inputs)

    def save_before_stopping(n: int) -> bool:
        if cfg.save_checkpoints and n % cfg.checkpoint_every:
            save(n)
        return cfg.save_checkpoints

    for step in preemption.StopOnSigterm(acc).steps(start, total, save_before_stopping):
        samples = schedule.step_samples(cfg.seed, step)
        targets = sum(examples[i].n_targets for i, counts in samples if counts)
        micro_batches = [next(batches) for _ in range(schedule.accumulation)]
        current_lr = scheduler.get_last_lr()[0]
        step_loss = ctx.step(micro_batches, targets)
        loss = acc.reduce(step_loss, reduction="sum").item()
        seen += sum(1 for _, counts in samples if counts)
        n = step + 1
        elapsed = time.monotonic() - t0
        rate = seen / max(elapsed, 1e-9)
        values = step_scalars(loss, current_lr, ctx.grad_norm, rate, cuda)
        points.append([n, time.time(), values])
        if events is not None:
            events.scalars(n, values, points[-1][1])
        for run in tracked.values():
            run.metrics(n, values, points[-1][1])
        if n % cfg.log_every == 0 or n == total:
            eta = (total - n) * elapsed / max(n - start, 1)
            rec = {"step": n, "total": total, "loss": round(loss, 6), "lr": current_lr,
                   "samples_per_s": round(rate, 3), "eta_s": round(eta, 1)}
            metrics.append(rec)
            if acc.is_main_process:
                log.info("finetune: step %d/%d loss %.4f lr %.3g %.2f samples/s ETA %.0fs",
                         n, total, loss, current_lr, rate, eta)
                U.write_text(U.join(cfg.out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
                if events is not None:
                    events.flush()
                for run in tracked.values():
                    run.flush()
        if cfg.save_checkpoints and (n % cfg.checkpoint_every == 0 or n == total):
            save(n)
    acc.wait_for_everyone()
    ctx.release_optimizer()
    from mysproj.training.export import export

    summary = export(ctx, out, tokenizer, processor, base_dtype, metrics)
    if events is not None:
        summary["tensorboard"] = events.close(out)
    for name, run in tracked.items():
        summary[name] = run.end()
    session.forget_deepspeed()
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    summary.update(strategy=cfg.strategy, steps=total, resumed_from=resumed_from, base_model=cfg.model,
                   data=cfg.data, random_weights=loaded.random_weights, global_batch=global_batch,
                   per_device_batch=micro, accumulation=schedule.accumulation, world_size=world, lr=lr,
                   projector_lr=projector_lr if cfg.strategy == "lora" else None, precision="bf16" if bf16 else "fp32",
                   deepspeed=ds_name, shared_prefix=ctx.shared is not None, conv=cfg.conv, examples=len(examples),
                   fill=cfg.fill, group_by_length=cfg.group_by_length,
                   tokenization_mismatches=sum(1 for e in examples if e.mismatch),
                   truncated_examples=sum(1 for e in examples if e.truncated),
                   trainable_parameters=n_trainable,
                   memory_plan=ctx.plan.summary() if ctx.plan is not None and ctx.plan.gpu_bytes else None,
                   final_loss=metrics[-1]["loss"] if metrics else None,
                   samples_per_s=metrics[-1]["samples_per_s"] if metrics else None,
                   processed=processed(total * global_batch, "samples",
                                       metrics[-1]["samples_per_s"] if metrics else None))
    return summary
