"""The released DeepSpeed configs (LLaVA `scripts/zero2.json`, `zero3.json`, `zero3_offload.json`), values as shipped,
with their "auto" entries filled the way the HF Trainer fills them (batch sizes from the run, bucket sizes from
the model's hidden size). The released configs have no `gradient_clipping` key, which the HF Trainer fills only where
it says "auto", so the DeepSpeed they pinned (0.12.6) kept its default 0: no clipping. DeepSpeed 0.19.3 made the
default 1.0, so the key is always written: `max_grad_norm`, 0 = off."""

from __future__ import annotations

import copy

_PRECISION = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
}

ZERO2 = {**_PRECISION, "zero_optimization": {
    "stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
    "reduce_bucket_size": "auto"}}

ZERO3 = {**_PRECISION, "zero_optimization": {
    "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
    "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}}

ZERO3_OFFLOAD = copy.deepcopy(ZERO3)
ZERO3_OFFLOAD["zero_optimization"].update(
    offload_optimizer={"device": "cpu", "pin_memory": True},
    offload_param={"device": "cpu", "pin_memory": True})

CONFIGS = {"zero2": ZERO2, "zero3": ZERO3, "zero3-offload": ZERO3_OFFLOAD}


def filled(name: str, *, micro_batch: int, accumulation: int, world: int, hidden_size: int,
           bf16: bool, max_grad_norm: float) -> dict:
    cfg = copy.deepcopy(CONFIGS[name])
    cfg["fp16"]["enabled"] = False
    cfg["bf16"]["enabled"] = bf16
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro_batch * accumulation * world
    cfg["gradient_clipping"] = max_grad_norm
    cfg["steps_per_print"] = 10**9
    zero = cfg["zero_optimization"]
    zero["reduce_bucket_size"] = hidden_size * hidden_size
    if zero["stage"] == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    return cfg
