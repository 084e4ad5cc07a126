"""What a finished fine-tune writes at its output root (docs/paper.md#the-released-scripts).

- projector: `projector.safetensors` (HF names) and `mm_projector.bin` (original LLaVA names
  `model.mm_projector.{0,2}.{weight,bias}`, what the released code's merge script reads), plus `projector_config.json`.
- full: an HF-layout model (safetensors, config, tokenizer, processor).
- lora: the same with the adapters merged in, and `adapter/` (peft adapter + the trained projector).
Exported weights are in the base model's dtype.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from mysproj.models.conversion import PROJECTOR_HF_TO_ORIGINAL
from mysproj.models.saving import save_hf_model
from mysproj.training.strategies import PROJECTOR_PREFIX, adapter_state, base_name, merge_lora


def export(ctx, out, tokenizer, processor, base_dtype, metrics: list[dict]) -> dict:
    acc, strategy = ctx.accelerator, ctx.cfg.strategy
    zero3 = bool(ctx.deepspeed and ctx.deepspeed.startswith("zero3"))
    if strategy == "projector" and not zero3:
        state = {n: p.detach() for n, p in ctx.unwrapped.named_parameters()
                 if base_name(n).startswith(PROJECTOR_PREFIX)}
    else:
        state = acc.get_state_dict(ctx.model)  # every rank takes part in the ZeRO-3 gather
    files: list[str] = []
    if acc.is_main_process:
        llava = ctx.unwrapped.get_base_model() if hasattr(ctx.unwrapped, "get_base_model") else ctx.unwrapped
        config = llava.config
        with out.staging() as tmp:
            proj = {base_name(k): v.detach().cpu().to(base_dtype).contiguous() for k, v in state.items()
                    if base_name(k).startswith(PROJECTOR_PREFIX)}
            if strategy == "projector":
                save_file(proj, os.path.join(tmp, "projector.safetensors"), metadata={"format": "pt"})
                torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: v for k, v in proj.items()},
                           os.path.join(tmp, "mm_projector.bin"))
                with open(os.path.join(tmp, "projector_config.json"), "w") as f:
                    json.dump({"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": config.vision_config.hidden_size,
                               "hidden_size": config.text_config.hidden_size}, f, indent=2)
            else:
                if strategy == "lora":
                    peft_cfg = ctx.unwrapped.peft_config["default"]
                    adapter_dir = os.path.join(tmp, "adapter")
                    os.makedirs(adapter_dir)
                    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state(state).items()},
                              os.path.join(adapter_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
                    peft_cfg.save_pretrained(adapter_dir)
                    save_file(proj, os.path.join(adapter_dir, "projector.safetensors"), metadata={"format": "pt"})
                    merged = merge_lora(state, peft_cfg.lora_alpha / peft_cfg.r)
                else:
                    merged = {base_name(k): v for k, v in state.items()}
                # cast where the weights are and moved to the CPU a shard at a time (save_state_dict)
                save_hf_model(merged, config, tokenizer, processor, tmp, dtype=base_dtype,
                              on_file=out.sender(tmp))
            out.put_dir(tmp, move=True)
            files = sorted(out.files)
        out.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    acc.wait_for_everyone()
    return {"outputs": files, "layout": "projector" if strategy == "projector" else "hf"}
