"""One fine-tuning run's trainable state, built the same way for the stage (`loop.train`) and for
`mysproj bench finetune`: the memory plan and the accelerator (accelerate / DeepSpeed), then the model set up in
one fixed order (`mysproj.training.setup`: freezing, casts, checkpointing, optimizer, wrapping, FP8 and compiled
layers); and the optimizer step.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import accelerate
import accelerate.utils
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mysproj.models.conversation import IGNORE_INDEX
from mysproj.speed.device import allow_tf32
from mysproj.training import memory_fit, setup
from mysproj.training.deepspeed_configs import filled
from mysproj.training.loss import answer_loss_sum

log = logging.getLogger("mysproj.finetune")


@dataclass
class Session:
    cfg: Any
    accelerator: Any
    model: Any          # prepared (DDP / DeepSpeed engine / plain module)
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    deepspeed: str | None
    precision: str      # bf16 | fp32
    pixel_dtype: Any
    trainable: list
    world: int
    shared: Any = None  # SharedPrefixForward where it applies (projector strategy)
    plan: Any = None    # memory_fit.Plan: offloads, pinning, the memory figures behind them
    grad_norm: float | None = None  # global gradient norm of the last optimizer step (before any clipping)
    rates: Any = None   # setup.LearningRates: the run's learning rates, resolved once

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def step(self, micro_batches, targets: int):
        """One optimizer step over this rank's micro-batches; `targets` = supervised tokens of the global batch.
        Returns this rank's share of the step's loss (a 0-dim tensor, not synchronised): summed over the ranks,
        the loss whose gradient the step took."""

        acc, accumulation = self.accelerator, len(micro_batches)
        total = torch.zeros((), device=acc.device)
        for batch in micro_batches:
            with acc.accumulate(self.model):
                loss_sum = answer_loss_sum(self.model, batch, self.pixel_dtype, acc.device, self.shared)
                scale = self.loss_scale(batch, targets, accumulation)
                acc.backward(loss_sum * scale)
                if acc.sync_gradients:
                    if not self.deepspeed:
                        self.grad_norm = self._grad_norm()
                    self.optimizer.step()
                    if self.deepspeed:  # the engine computes the norm inside its step (None where it did not)
                        norm = getattr(self.model, "get_global_grad_norm", lambda: None)()
                        self.grad_norm = None if norm is None else float(norm)
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss_sum.detach() * (scale / (self.world * accumulation))
        self.scheduler.step()
        return total

    def release_optimizer(self) -> None:
        """Drop the optimizer's state after the last step (and its checkpoint): exporting the weights does not
        need it. Adam's two moments are 8 bytes a trained parameter, in host memory when the optimizer is
        offloaded, and the ZeRO-3 gather of the whole model for the export needs room there (7B on one 80 GB card:
        the export would not fit beside them)."""
        inner = self.optimizer
        while True:
            state = getattr(inner, "state", None)
            if isinstance(state, dict):
                state.clear()
            nested = getattr(inner, "optimizer", None)
            if nested is None or nested is inner:
                break
            inner = nested

        gc.collect()

    def _grad_norm(self) -> float | None:
        """The global norm of the trainable gradients (clipped to `max_grad_norm` where set): what TensorBoard
        shows as gradient norm."""

        if self.cfg.max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        grads = [p.grad for p in self.trainable if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def loss_scale(self, batch, targets: int, accumulation: int) -> float:
        """The factor on a micro-batch's summed token loss before backward. accelerate (or DeepSpeed) divides by
        the accumulation steps and DDP (or ZeRO) averages over the processes, so `micro-batch` (the HF Trainer's
        loss: the micro-batch's mean token loss) gives the mean of the micro-batch means, and `global-batch`
        gives the sum over the global batch divided by its supervised tokens. A micro-batch without supervised
        tokens (filler, mismatched examples) adds nothing."""
        if self.cfg.loss_normalization == "global-batch":
            return self.world * accumulation / max(targets, 1)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return 1.0 / n if n else 0.0


def forget_deepspeed() -> None:
    """accelerate registers the DeepSpeed config with transformers globally; with ZeRO-3 every model built later in
    this process would be partitioned. Drop it once a run is over (merge or eval may follow in-process)."""

    unset_hf_deepspeed_config()


def accelerator(ds_name, bf16, accumulation, world, micro, hidden, max_grad_norm, cuda, plan=None):
    if world == 1:  # accelerate keeps its state per process: a second run in-process may differ (tests, DS on/off)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        forget_deepspeed()
    plugin = None
    if ds_name:
        # A single GPU without a launcher still needs a (1-process) process group for DeepSpeed.
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29511")):
            os.environ.setdefault(k, v)
        ds_cfg = filled(ds_name, micro_batch=micro, accumulation=accumulation, world=world, hidden_size=hidden,
                        bf16=bf16, max_grad_norm=max_grad_norm)
        if ds_name == "zero3-offload" and plan is not None and plan.gpu_need:  # a GPU run sized by memory_fit
            memory_fit.apply(ds_cfg, plan)
        if ds_name == "zero3-offload":
            ds_cfg["zero_force_ds_cpu_optimizer"] = False
        plugin = accelerate.utils.DeepSpeedPlugin(hf_ds_config=ds_cfg)
    acc = accelerate.Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=accumulation,
                                 deepspeed_plugin=plugin, cpu=not cuda and not ds_name)
    if acc.num_processes != world:
        raise RuntimeError(f"accelerate sees {acc.num_processes} processes but WORLD_SIZE is {world}")
    return acc


def uses_bf16(cfg, cuda: bool) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)


def build(cfg, model, *, world: int, micro: int, accumulation: int, total_steps: int) -> Session:
    """`model` (LlavaForConditionalGeneration, on the CPU or already on the card) -> a ready Session: the memory
    plan, the accelerator, then the model set up in `mysproj.training.setup`'s order."""

    cuda = torch.cuda.is_available()
    if cuda:
        allow_tf32()
    bf16 = uses_bf16(cfg, cuda)
    trains = (model.model.language_model, model.lm_head, model.model.multi_modal_projector)  # what `full` trains
    plan = memory_fit.plan(trainable=sum(p.numel() for m in trains for p in m.parameters()),
                           total=sum(p.numel() for p in model.parameters()),
                           gpu_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else 0,
                           host=memory_fit.host_memory(), world=world, strategy=cfg.strategy,
                           requested=cfg.deepspeed, cuda=cuda)
    memory_fit.check(plan)  # before DeepSpeed allocates anything: a refusal, not the OOM killer
    ds_name = plan.deepspeed
    acc = accelerator(ds_name, bf16, accumulation, world, micro, model.config.text_config.hidden_size,
                      cfg.max_grad_norm, cuda, plan)
    torch.manual_seed(cfg.seed)  # LoRA's new weights are drawn in the set-up
    done = setup.set_up(cfg, model, acc, ds_name=ds_name, cuda=cuda, total_steps=total_steps)
    pixel_dtype = next(done.unwrapped.parameters()).dtype if ds_name else (torch.bfloat16 if bf16 else torch.float32)
    return Session(cfg, acc, done.model, done.unwrapped, done.optimizer, done.scheduler, ds_name,
                   "bf16" if bf16 else "fp32", pixel_dtype, [p for p in done.model.parameters() if p.requires_grad],
                   world, done.shared, plan=plan, rates=done.rates)
