"""`mysproj bench finetune`: one optimizer step of the fine-tune stage (projector-only or end-to-end).

ours: the finetune stage's setup and step (`mysproj.training`: strategy freezing, fp32 master weights, activation
checkpointing, AdamW, accelerate / DeepSpeed as `--set deepspeed=...` and the stage's `auto` choose) on a
random-weight model built directly on the card. One timed step = one micro-batch per rank and an optimizer step
(accumulation 1). Under `torchrun --nproc-per-node N` every rank runs it and rank 0 reports N x the samples.
baseline (1 GPU): plain transformers as in the issue's anchors: `LlavaForConditionalGeneration(labels=...)`
forward/backward, fused AdamW on the bf16 weights, activation checkpointing for `full` only. Both see the same
synthetic batches (576 image + `--text-tokens` text tokens, `--answer-tokens` supervised), so their losses are
comparable step by step; the baseline runs first and is freed before ours is built.
"""

from __future__ import annotations

import logging
import os

from mysproj.bench import flops as F
from mysproj.bench import synthetic
from mysproj.bench.results import BenchReport, Measurement, card_name
from mysproj.bench.timing import free_memory, time_steps

log = logging.getLogger("mysproj.bench")
DISTINCT_BATCHES = 2  # batches cycled through (data variety is irrelevant to speed; memory is not)


def world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def build_model(args, device: str):
    """(model, tokenizer) of the preset with random weights, created on `device` in the stage's load dtype."""
    import torch

    from mysproj.models.init import build_random_llava

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
    import torch

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
    from mysproj.config.fields import load_config
    from mysproj.config.stages import FinetuneConfig

    values = {"model": "bench:random", "data": "bench:synthetic", "out": "bench:none", "strategy": args.strategy,
              "per_device_batch": args.batch_size, "global_batch": args.batch_size * n_world, "seed": args.seed,
              "max_steps": args.warmup + args.steps, "workers": 0}
    values.update(dict(args.set or []))
    return load_config(FinetuneConfig, env={}, overrides=values)


def _ours(args, device: str, layout, n_world: int, rank: int):
    cfg = finetune_config(args, n_world)
    model, _, load_dtype = build_model(args, device)
    dims = F.LlavaDims.from_config(model.config)
    session = TrainingSession(cfg, model, n_world)
    data = batches(model.config, layout, args.batch_size, args.seed + 1000 * rank, device, session.pixel_dtype)
    targets = int((data[0]["labels"] != -100).sum()) * n_world
    losses = []

    def step(i):
        losses.append(session.step([data[i % len(data)]], targets))

    timing = time_steps(step, device=device, warmup=args.warmup, steps=args.steps)
    what = (f"mysproj.training ({cfg.strategy}, deepspeed {session.deepspeed or 'off'}, "
            f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {session.precision})")
    m = Measurement("ours", what, args.batch_size, args.batch_size * n_world, timing, 0.0, n_devices=n_world,
                    extra={"losses": [round(x, 5) for x in losses]})
    return m, dims


class TrainingSession:
    """Bench hook around the finetune stage's setup and optimizer step, built from `mysproj.training`'s own
    pieces (strategies, the accelerator/DeepSpeed builder, the loss) with the lines of `loop.train` between them;
    uses `loop.prepare`/`loop.train_step` instead as soon as the stage factors them out."""

    def __init__(self, cfg, model, n_world: int):
        import inspect
        import math

        import torch

        from mysproj.training import loop, strategies

        cuda = next(model.parameters()).is_cuda
        if cuda:  # as loop.train (the seed scripts' --tf32 True)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.precision = "bf16" if bf16 else "fp32"
        self.deepspeed = loop.resolve_deepspeed(cfg.deepspeed, cfg.strategy, cuda, n_world)
        lr = cfg.lr if cfg.lr is not None else strategies.DEFAULT_LR[cfg.strategy]
        projector_lr = cfg.projector_lr if cfg.projector_lr is not None else 2e-5
        known = {"ds_name": self.deepspeed, "bf16": bf16, "accumulation": 1, "world": n_world,
                 "micro": cfg.per_device_batch, "hidden": model.config.text_config.hidden_size,
                 "max_grad_norm": cfg.max_grad_norm, "cuda": cuda}
        wanted = inspect.signature(loop._accelerator).parameters
        self.acc = loop._accelerator(**{k: v for k, v in known.items() if k in wanted})
        model = strategies.apply(model, cfg.strategy, cfg)
        if not self.deepspeed:
            for p in model.parameters():  # as loop.train: fp32 master weights for what trains
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            model.model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        groups = strategies.param_groups(model, cfg.strategy, lr, projector_lr, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                      foreach=False if self.deepspeed == "zero3-offload" else None)
        total = cfg.max_steps or 1
        self.scheduler = loop.cosine_with_warmup(optimizer, math.ceil(total * cfg.warmup_ratio), total)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm, self.n_world = cfg.max_grad_norm, n_world
        unwrapped = self.acc.unwrap_model(self.model)
        self.pixel_dtype = (next(unwrapped.parameters()).dtype if self.deepspeed
                            else (torch.bfloat16 if bf16 else torch.float32))

    def step(self, micro_batches: list[dict], targets: int) -> float:
        """One optimizer step over `micro_batches` (this rank's); `targets` = supervised tokens of the global
        batch. Returns this rank's loss sum / targets (a float: the step's result is waited for)."""
        import torch
        import torch.nn.functional as F

        acc, accumulation = self.acc, len(micro_batches)
        total = torch.zeros((), device=acc.device)
        for batch in micro_batches:
            with acc.accumulate(self.model):
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"].to(self.pixel_dtype), use_cache=False)
                logits = out.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
                acc.backward(loss_sum * (self.n_world * accumulation / targets))
                if acc.sync_gradients:
                    if not self.deepspeed and self.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.trainable, self.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss_sum.detach()
        self.scheduler.step()
        return float(total) / targets * self.n_world


def _baseline(args, device: str, layout) -> Measurement:
    """Plain transformers: the model's own loss, backward, fused AdamW on bf16 weights (fp32 on CPU)."""
    import torch

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
