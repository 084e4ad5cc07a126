"""`mysproj bench finetune`: one optimizer step of the fine-tune stage (projector-only or end-to-end).

ours: the finetune stage's setup and step (`mysproj.training`: strategy freezing, fp32 master weights, activation
checkpointing, AdamW, accelerate / DeepSpeed as `--set deepspeed=...` and the stage's `auto` choose) on a
random-weight model built directly on the card. One timed step = one micro-batch per rank and an optimizer step
(`--set per-device-batch=M` splits the `--batch-size` samples of a step into micro-batches of M, accumulated
as the stage does). Under `torchrun --nproc-per-node N` every rank runs it and rank 0 reports N x the samples.
baseline (1 GPU): plain transformers as a user would write it: `LlavaForConditionalGeneration(labels=...)`
forward/backward, fused AdamW on the bf16 weights, activation checkpointing for `full` only. Both see the same
synthetic batches (576 image + `--text-tokens` text tokens, `--answer-tokens` supervised), so their losses are
comparable step by step; the baseline runs first and is freed before ours is built.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from mysproj.bench import flops as F
from mysproj.bench import synthetic
from mysproj.bench.command import ours_config
from mysproj.bench.measurement import BenchReport, Measurement, card_name
from mysproj.bench.timing import free_memory, time_steps
from mysproj.errors import BadInput
from mysproj.models import compile_cache
from mysproj.models.presets import build_random_llava
from mysproj.training.session import build as build_session
from mysproj.training.setup import checkpointing

log = logging.getLogger("mysproj.bench")
DISTINCT_BATCHES = 2  # batches cycled through (data variety is irrelevant to speed; memory is not)


def world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def build_model(args, device: str):
    """(model, tokenizer) of the preset with random weights, created on `device` in the stage's load dtype."""

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer, _ = build_random_llava(args.preset, seed=args.seed, dtype=dtype, device=device)
    return model, tokenizer, getattr(torch, dtype)


def batches(config, layout, batch: int, seed: int, device: str, pixel_dtype) -> list[dict]:
    out = []
    for k in range(DISTINCT_BATCHES):
        b = synthetic.token_batch(config, layout, batch, seed=seed + k, labels=True)
        b["pixel_values"] = synthetic.pixel_batch(config, batch, seed=seed + k, dtype=pixel_dtype)
        out.append({n: t.to(device) for n, t in b.items()})
    return out


def run(args) -> BenchReport:
    n_world, rank = world()
    device = args.device
    if device == "cuda" and n_world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    layout = synthetic.TokenLayout.with_text(args.text_tokens, answer=args.answer_tokens)
    settings = {"strategy": args.strategy, "text_tokens": layout.text, "text_before_image": layout.before_image,
                "answer_tokens": layout.answer, "world_size": n_world, "overrides": dict(args.set or [])}
    measurements = []
    if args.baseline:
        if n_world > 1:
            log.warning("bench finetune: --baseline is single-GPU; skipped under %d processes", n_world)
        else:
            measurements.append(_baseline(args, device, layout))
            free_memory(device)  # the baseline's model and optimizer went out of scope with its frame
    ours, dims = _ours(args, device, layout, n_world, rank)
    measurements.insert(0, ours)
    flops = F.llava_train_step(dims, strategy=args.strategy, text_before_image=layout.before_image,
                               text_after_image=layout.after_image, label_tokens=layout.answer)
    for m in measurements:
        m.flops_per_item = flops["total"]
    return BenchReport("finetune", args.preset, device, card_name(args.device), args.peak_tflops, settings, flops,
                       measurements)


def finetune_config(args, n_world: int):
    return ours_config("finetune", {"model": "bench:random", "data": "bench:synthetic", "out": "bench:none",
                                    "strategy": args.strategy, "per_device_batch": args.batch_size,
                                    "global_batch": args.batch_size * n_world, "seed": args.seed,
                                    "max_steps": args.warmup + args.steps, "workers": 0}, args)


def checkpointed(cfg, config) -> str:
    if not checkpointing(cfg):
        return "off"
    layers = config.text_config.num_hidden_layers
    return "on" if cfg.checkpoint_layers is None else f"{min(cfg.checkpoint_layers, layers)} of {layers} layers"


def _ours(args, device: str, layout, n_world: int, rank: int):
    cfg = finetune_config(args, n_world)
    model, _, _ = build_model(args, device)
    dims = F.LlavaDims.from_config(model.config)
    micro = cfg.per_device_batch
    if args.batch_size % micro:
        raise BadInput(f"--set per-device-batch={micro} must divide --batch-size {args.batch_size}")
    accumulation = args.batch_size // micro
    session = build_session(cfg, model, world=n_world, micro=micro, accumulation=accumulation,
                            total_steps=cfg.max_steps)
    data = batches(model.config, layout, micro, args.seed + 1000 * rank, device, session.pixel_dtype)
    targets = int((data[0]["labels"] != -100).sum()) * accumulation * n_world
    losses = []

    def step(i):
        micro_batches = [data[(i * accumulation + j) % len(data)] for j in range(accumulation)]
        losses.append(float(session.step(micro_batches, targets)) * n_world)

    t0 = time.perf_counter()
    with compile_cache.persistent(cfg.compile_cache, store=rank == 0) as cache:  # as the stage does
        timing = time_steps(step, device=device, warmup=args.warmup, steps=args.steps, profile=args.profile)
    # the warm-up steps (compilation included) and the cache traffic: what a stage pays before its steady state
    warmup_s = time.perf_counter() - t0 - sum(timing.step_s)
    what = (f"mysproj.training ({cfg.strategy}, deepspeed {session.deepspeed or 'off'}, "
            f"micro-batch {micro} x {accumulation}, checkpointing {checkpointed(cfg, model.config)}, "
            f"{session.precision}"
            f"{', fp8 frozen LLM' if cfg.fp8 else ', fp8 input gradients' if cfg.fp8_backward else ''}"
            f"{', compiled layers' if cfg.compile else ''})")
    m = Measurement("ours", what, args.batch_size, args.batch_size * n_world, timing, 0.0, n_devices=n_world,
                    extra={"losses": [round(x, 5) for x in losses], "warmup_s": round(warmup_s, 2),
                           **({"compile_cache": cache} if cache else {})})
    return m, dims


def _baseline(args, device: str, layout) -> Measurement:
    """Plain transformers: the model's own loss, backward, fused AdamW on bf16 weights (fp32 on CPU)."""

    model, _, dtype = build_model(args, device)
    model.requires_grad_(False)
    train = ["model.multi_modal_projector."] + (["model.language_model.", "lm_head."]
                                                 if args.strategy == "full" else [])
    params = [p for n, p in model.named_parameters() if any(n.startswith(t) for t in train)]
    for p in params:
        p.requires_grad_(True)
    if args.strategy == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lr = 1e-3 if args.strategy == "projector" else 2e-5
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.startswith("cuda"))
    data = batches(model.config, layout, args.batch_size, args.seed, device, dtype)
    losses = []

    def step(i):
        out = model(**data[i % len(data)], use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))

    timing = time_steps(step, device=device, warmup=args.warmup, steps=args.steps)
    what = (f"transformers LlavaForConditionalGeneration(labels=) + fused AdamW, {str(dtype).split('.')[-1]}, "
            f"checkpointing {'on' if args.strategy == 'full' else 'off'}")
    return Measurement("baseline", what, args.batch_size, args.batch_size, timing, 0.0,
                       extra={"losses": [round(x, 5) for x in losses]})
