"""The fine-tuning loop: one code path for a CPU process, one GPU, and torchrun on many GPUs/nodes (accelerate, with
DeepSpeed ZeRO on GPUs when distributed).

Loss: the mean token cross-entropy over the answer tokens of the whole global batch (summed per micro-batch and
divided by the step's target-token count, which every rank computes from the data order, so gradient accumulation
and the number of GPUs do not change the result).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from mysproj.storage import uri as U
from mysproj.training import checkpoint, strategies
from mysproj.training.data import MicroBatches, Schedule, TrainSet, collate, load_examples

log = logging.getLogger("mysproj.finetune")


@dataclass
class Context:
    cfg: Any
    accelerator: Any
    model: Any          # prepared (DDP / DeepSpeed engine / plain module)
    unwrapped: Any
    optimizer: Any
    deepspeed: str | None


def resolve_deepspeed(choice: str, strategy: str, cuda: bool, world: int) -> str | None:
    """The DeepSpeed config to use, or None. `auto` uses DeepSpeed on GPUs only; naming a stage also works on
    CPUs (DeepSpeed's CPU accelerator), which is how the tests run this code path."""
    if choice != "auto":
        return None if choice == "none" else choice
    if not cuda:
        return None
    if strategy == "projector":
        return "zero2" if world > 1 else None
    if world > 1:
        return "zero3"
    # 7B full fine-tuning with fp32 Adam states does not fit one 80 GB GPU: offload the optimizer to the CPU.
    return "zero3-offload" if strategy == "full" else None


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """transformers' get_cosine_schedule_with_warmup (linear warmup, half-cosine to 0), without importing the
    Trainer stack it lives in."""
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_micro_batch(global_batch: int, world: int, requested: int | None) -> int:
    if requested:
        return requested
    per_rank = max(1, global_batch // world)
    b = min(16, per_rank)
    while per_rank % b:
        b -= 1
    return b


def _forget_deepspeed() -> None:
    """accelerate registers the DeepSpeed config with transformers globally; with ZeRO-3 every model built later in
    this process would be partitioned. Drop it once a run is over (merge or eval may follow in-process)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _accelerator(ds_name, bf16, accumulation, world, micro, hidden, max_grad_norm, cuda):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if world == 1:  # accelerate keeps its state per process: a second run in-process may differ (tests, DS on/off)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        _forget_deepspeed()
    plugin = None
    if ds_name:
        from accelerate.utils import DeepSpeedPlugin

        from mysproj.training.deepspeed_configs import filled

        # A single GPU without a launcher still needs a (1-process) process group for DeepSpeed.
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29511")):
            os.environ.setdefault(k, v)
        ds_cfg = filled(ds_name, micro_batch=micro, accumulation=accumulation, world=world, hidden_size=hidden,
                        bf16=bf16, max_grad_norm=max_grad_norm)
        if ds_name == "zero3-offload":
            ds_cfg["zero_force_ds_cpu_optimizer"] = False
        plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg)
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=accumulation,
                      deepspeed_plugin=plugin, cpu=not cuda and not ds_name)
    if acc.num_processes != world:
        raise RuntimeError(f"accelerate sees {acc.num_processes} processes but WORLD_SIZE is {world}")
    return acc


def train(cfg, out) -> dict:
    import torch
    import torch.nn.functional as F

    from mysproj.data.prepared import PreparedData
    from mysproj.models.loading import load_llava

    cuda = torch.cuda.is_available()
    if cuda:  # the seed scripts' --tf32 True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    ds_name = resolve_deepspeed(cfg.deepspeed, cfg.strategy, cuda, world)
    lr = cfg.lr if cfg.lr is not None else strategies.DEFAULT_LR[cfg.strategy]
    projector_lr = cfg.projector_lr if cfg.projector_lr is not None else 2e-5
    global_batch = cfg.global_batch or strategies.DEFAULT_GLOBAL_BATCH[cfg.strategy]
    micro = default_micro_batch(global_batch, world, cfg.per_device_batch)

    data = PreparedData(cfg.data)
    loaded = load_llava(cfg.model, device="cpu", dtype=torch.bfloat16 if bf16 else torch.float32)
    model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    base_dtype = model.get_input_embeddings().weight.dtype
    examples = load_examples(data, tokenizer, model.config, conv=cfg.conv, max_length=cfg.model_max_length)
    schedule = Schedule(len(examples), global_batch, micro, world, cfg.epochs, cfg.max_steps)
    schedule.check()
    hidden = model.config.text_config.hidden_size
    acc = _accelerator(ds_name, bf16, schedule.accumulation, world, micro, hidden, cfg.max_grad_norm, cuda)
    torch.manual_seed(cfg.seed)

    model = strategies.apply(model, cfg.strategy, cfg)
    if not ds_name:
        for p in model.parameters():  # fp32 master weights for what trains; frozen weights stay in bf16
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        llava = model.get_base_model() if hasattr(model, "get_base_model") else model
        llava.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = strategies.param_groups(model, cfg.strategy, lr, projector_lr, cfg.weight_decay)
    # Offloaded to the CPU (7B full on one GPU), foreach's temporaries would cost another copy of the weights.
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  foreach=False if ds_name == "zero3-offload" else None)
    total = schedule.total_steps
    scheduler = cosine_with_warmup(optimizer, math.ceil(total * cfg.warmup_ratio), total)
    prepared, optimizer = acc.prepare(model, optimizer)
    ctx = Context(cfg, acc, prepared, acc.unwrap_model(prepared), optimizer, ds_name)

    start, metrics, resumed_from = 0, [], None
    done = checkpoint.complete_steps(cfg.out, cfg)
    if done:
        state = checkpoint.load(ctx, done[-1])
        start, metrics, resumed_from = state["step"], state["metrics"], done[-1]
        with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                scheduler.step()
        log.info("finetune: resumed from checkpoint step %d of %d", start, total)
    if acc.is_main_process:
        log.info("finetune: %s on %d examples, %d steps of %d (%d per device x %d processes x %d accumulation), lr %g, "
                 "%s, deepspeed %s, %.1fM trainable", cfg.strategy, len(examples), total, global_batch, micro, world,
                 schedule.accumulation, lr, "bf16" if bf16 else "fp32", ds_name or "off", n_trainable / 1e6)

    loader = torch.utils.data.DataLoader(
        TrainSet(examples, processor, cfg.image_aspect_ratio),
        batch_sampler=MicroBatches(schedule, cfg.seed, acc.process_index, start),
        collate_fn=collate(tokenizer.pad_token_id), num_workers=cfg.workers, pin_memory=cuda,
        generator=torch.Generator())  # its own generator: the global RNG (dropout) is left untouched
    batches = iter(loader)
    pixel_dtype = next(ctx.unwrapped.parameters()).dtype if ds_name else (torch.bfloat16 if bf16 else torch.float32)
    trainable = [p for p in prepared.parameters() if p.requires_grad]
    t0, seen = time.monotonic(), 0
    for step in range(start, total):
        samples = schedule.step_samples(cfg.seed, step)
        targets = sum(examples[i].n_targets for i, counts in samples if counts)
        step_loss = torch.zeros((), device=acc.device)
        for _ in range(schedule.accumulation):
            batch = next(batches)
            with acc.accumulate(prepared):
                out_ = prepared(input_ids=batch["input_ids"].to(acc.device),
                                attention_mask=batch["attention_mask"].to(acc.device),
                                pixel_values=batch["pixel_values"].to(acc.device, pixel_dtype), use_cache=False)
                logits = out_.logits[:, :-1].float()
                labels = batch["labels"][:, 1:].to(acc.device)
                loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
                acc.backward(loss_sum * (world * schedule.accumulation / targets))
                if acc.sync_gradients:
                    if not ds_name and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss_sum.detach()
        current_lr = scheduler.get_last_lr()[0]
        scheduler.step()
        loss = (acc.reduce(step_loss, reduction="sum") / targets).item()
        seen += sum(1 for _, counts in samples if counts)
        n = step + 1
        if n % cfg.log_every == 0 or n == total:
            elapsed = time.monotonic() - t0
            rate = seen / max(elapsed, 1e-9)
            eta = (total - n) * elapsed / max(n - start, 1)
            rec = {"step": n, "total": total, "loss": round(loss, 6), "lr": current_lr,
                   "samples_per_s": round(rate, 3), "eta_s": round(eta, 1)}
            metrics.append(rec)
            if acc.is_main_process:
                log.info("finetune: step %d/%d loss %.4f lr %.3g %.2f samples/s ETA %.0fs",
                         n, total, loss, current_lr, rate, eta)
                U.write_text(U.join(cfg.out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
        if cfg.save_checkpoints and (n % cfg.checkpoint_every == 0 or n == total):
            checkpoint.save(ctx, n, {"step": n, "metrics": metrics})
            if acc.is_main_process:
                checkpoint.prune(cfg.out, cfg, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    from mysproj.training.export import export

    summary = export(ctx, out, tokenizer, processor, base_dtype, metrics)
    _forget_deepspeed()
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    summary.update(strategy=cfg.strategy, steps=total, resumed_from=resumed_from, base_model=cfg.model,
                   data=cfg.data, random_weights=loaded.random_weights, global_batch=global_batch,
                   per_device_batch=micro, accumulation=schedule.accumulation, world_size=world, lr=lr,
                   projector_lr=projector_lr if cfg.strategy == "lora" else None, precision="bf16" if bf16 else "fp32",
                   deepspeed=ds_name, conv=cfg.conv, examples=len(examples), trainable_parameters=n_trainable,
                   final_loss=metrics[-1]["loss"] if metrics else None,
                   samples_per_s=metrics[-1]["samples_per_s"] if metrics else None)
    return summary
