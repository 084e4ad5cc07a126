"""A fine-tuning run's model set-up, in one fixed order (as torchtitan's `parallelize_*` applies its parts): each
step works on what the steps before it made, so the order is part of the contract.

1. freeze      what trains per strategy (`strategies.apply`; LoRA adapters wrapped here): every later step asks
               `requires_grad`.
2. place       `cast_on_gpu`, runs without DeepSpeed: the model moves to the GPU in its stored dtype, so half the
               bytes move and step 3 casts on the card.
3. cast        fp32 master weights for what trains; frozen weights keep their dtype (DeepSpeed keeps its own fp32
               copies, so not under DeepSpeed).
4. checkpoint  activation checkpointing in the LLM where memory needs it (`checkpointing`).
5. optimizer   AdamW over the strategy's parameter groups at the learning rates resolved once
               (`learning_rates`), and the cosine schedule with warmup.
6. wrap        accelerate's `prepare`: DDP or a DeepSpeed ZeRO engine around the model and the optimizer.
7. speed       FP8 and compiled layers on the prepared model (`mysproj.speed.llava.apply`): the weights are in place
               and the swapped or compiled modules hold no trained parameter.
8. prefix      the projector strategy's SharedPrefixForward where nothing above rules it out (it reads steps 4, 6).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from mysproj.config.stages import DEFAULT_LR, DEFAULT_PROJECTOR_LR
from mysproj.models.shared_prefix import SharedPrefixForward
from mysproj.speed import llava as speed
from mysproj.speed.llava import ZERO3
from mysproj.training import strategies

log = logging.getLogger("mysproj.finetune")


@dataclass(frozen=True)
class LearningRates:
    lr: float
    projector_lr: float   # the projector's own group under lora (the released scripts' mm_projector_lr)


def learning_rates(cfg) -> LearningRates:
    """The run's learning rates: the config's, else the strategy's default (`mysproj.config.stages.DEFAULT_LR`)."""
    return LearningRates(cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.strategy],
                         cfg.projector_lr if cfg.projector_lr is not None else DEFAULT_PROJECTOR_LR)


@dataclass
class SetUp:
    model: Any          # prepared (DDP / DeepSpeed engine / plain module)
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    rates: LearningRates
    shared: Any = None  # SharedPrefixForward where it applies


def set_up(cfg, model, acc, *, ds_name: str | None, cuda: bool, total_steps: int) -> SetUp:
    """Steps 1-8 above on `model` (LlavaForConditionalGeneration on the CPU, or already on the card)."""

    rates = learning_rates(cfg)
    model = strategies.apply(model, cfg.strategy, cfg)                              # 1 freeze
    if not ds_name:
        if cuda and cfg.cast_on_gpu:                                                # 2 place
            model.to(acc.device)
        for p in model.parameters():                                                # 3 cast
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    apply_checkpointing(cfg, model)                                                 # 4 checkpoint
    model.train()
    optimizer, scheduler = _optimizer(cfg, model, rates, total_steps,               # 5 optimizer
                                      fused=cuda and ds_name != "zero3-offload")
    prepared, optimizer = acc.prepare(model, optimizer)                             # 6 wrap
    unwrapped = acc.unwrap_model(prepared)
    llava = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    speed.apply(llava, fp8=cfg.fp8, compile=cfg.compile and cuda, sharded=ds_name in ZERO3,  # 7 speed
                training=True, fp8_backward=cfg.fp8_backward)
    shared = shared_prefix(cfg, acc, prepared, llava, ds_name, cuda)                # 8 prefix
    return SetUp(prepared, unwrapped, optimizer, scheduler, rates, shared)


def _optimizer(cfg, model, rates: LearningRates, total_steps: int, *, fused: bool):
    groups = strategies.param_groups(model, cfg.strategy, rates.lr, rates.projector_lr, cfg.weight_decay)
    # foreach's temporaries would cost another copy of the trained weights (on the card, or in CPU memory when
    # offloaded); the fused kernel has none.
    optimizer = torch.optim.AdamW(groups, lr=rates.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  foreach=False, fused=fused)
    return optimizer, cosine_with_warmup(optimizer, math.ceil(total_steps * cfg.warmup_ratio), total_steps)


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """transformers' get_cosine_schedule_with_warmup (linear warmup, half-cosine to 0), without importing the
    Trainer stack it lives in."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compile_cache(cfg) -> str | None:
    """`cfg.compile_cache` where fine-tuning compiles layers (GPUs)."""

    return cfg.compile_cache if cfg.compile and torch.cuda.is_available() else None


def checkpointing(cfg) -> bool:
    """Activation checkpointing only where memory needs it: projector-only training keeps no optimizer state for
    the LLM and its activations fit (43 GiB at micro-batch 16), so it skips the recomputation; a micro-batch cap
    above 16 (the released 32 per device, which pretrain.sh ran with checkpointing) would not fit without it."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return cfg.strategy != "projector" or getattr(cfg, "max_micro_batch", 16) > 16


def apply_checkpointing(cfg, model) -> None:
    """Turn on activation checkpointing in the LLM where `checkpointing(cfg)`, in its first
    `cfg.checkpoint_layers` layers where set."""
    if not checkpointing(cfg):
        return
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    llm = llava.model.language_model
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.checkpoint_layers is not None:  # the rest keep their activations: no recomputation there
        for i, layer in enumerate(llm.layers):
            layer.gradient_checkpointing = i < cfg.checkpoint_layers


def shared_prefix(cfg, acc, prepared, llava, ds_name, cuda):
    """The projector strategy's SharedPrefixForward, where it applies. Not under DDP, whose gradient all-reduce is
    armed by its own forward (DeepSpeed's hooks sit on the parameters), nor ZeRO-3 (parameters gathered per
    module call), nor with checkpointing (the layer functions keep their activations)."""

    if cfg.strategy != "projector" or not cfg.shared_prefix:
        return None
    reason = ("checkpointing is on" if checkpointing(cfg) else
              "DDP" if isinstance(prepared, torch.nn.parallel.DistributedDataParallel) else
              "ZeRO-3" if ds_name in ZERO3 else
              "the language model is not a frozen Llama" if not SharedPrefixForward.supports(llava) else None)
    if reason:
        log.info("shared_prefix: off (%s); the model's own forward runs", reason)
        return None
    return SharedPrefixForward(llava, compile=cfg.compile and cuda, autocast=acc.autocast)
