"""What trains in each strategy (docs/paper.md#the-released-scripts), and how the trained model is exported.

- `projector` (FT-Proj, the released code's pretrain.sh with `tune_mm_mlp_adapter`): only the 2-layer projector.
- `full` (FT-E2E, finetune_task.sh): projector + the whole LLM; the CLIP tower stays frozen.
- `lora` (finetune_task_lora.sh): LoRA (r 128, alpha 256) on every LLM linear layer + the full projector, the
  projector at its own lr (`projector_lr`).

The learning rates and global batches these get by default: `mysproj.config.stages.DEFAULT_*`.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model

PROJECTOR_PREFIX = "model.multi_modal_projector."
VISION_PREFIX = "model.vision_tower."
# LLaVA's find_all_linear_names: every Linear of the LLM (not the tower, projector or lm_head).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"



def base_name(name: str) -> str:
    """A parameter name of the underlying LlavaForConditionalGeneration, with peft's wrapping removed."""
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer.", ".")


def apply(model, strategy: str, cfg):
    """Set requires_grad per strategy (wrapping LoRA adapters for `lora`); returns the model to train."""
    model.requires_grad_(False)
    if strategy == "lora":
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        plain = base_name(name)
        if plain.startswith(PROJECTOR_PREFIX):
            p.requires_grad_(True)
        elif strategy == "full" and not plain.startswith(VISION_PREFIX):
            p.requires_grad_(True)
        elif strategy == "lora" and "lora_" in name:
            p.requires_grad_(True)
    return model


def param_groups(model, strategy: str, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups; for lora the projector gets `projector_lr` (the released code's mm_projector_lr)."""
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if base_name(name).startswith(PROJECTOR_PREFIX) else rest).append(p)
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
    if proj:
        plr = projector_lr if (strategy == "lora" and projector_lr is not None) else lr
        groups.append({"params": proj, "lr": plr, "weight_decay": weight_decay})
    return groups


def merge_lora(state_dict: dict, scaling: float) -> dict:
    """A peft model's full state dict -> the plain model's, with W + scaling * B @ A folded in (peft's merge for
    Linear layers); works on a gathered (ZeRO-3) state dict, no model instance needed."""

    out, lora_a, lora_b = {}, {}, {}
    for name, t in state_dict.items():
        if ".lora_A." in name:
            lora_a[name.split(".lora_A.")[0]] = t
        elif ".lora_B." in name:
            lora_b[name.split(".lora_B.")[0]] = t
        else:
            out[base_name(name)] = t
    for module, a in lora_a.items():
        key = base_name(module) + ".weight"
        w = out[key]
        delta = (lora_b[module].float() @ a.float()) * scaling
        out[key] = (w.float() + delta).to(w.dtype) if w.dtype != torch.float32 else w + delta
    return out


def adapter_state(state_dict: dict) -> dict:
    """peft's adapter file layout: `base_model.model.<module>.lora_A.weight` (adapter name dropped)."""
    return {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v
            for k, v in state_dict.items() if ".lora_A." in k or ".lora_B." in k}
