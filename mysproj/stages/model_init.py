"""Stage `model-init`: a random-weight model of a preset architecture, with a working tokenizer and processor.

LLaVA presets (`tiny`, `llava-1.5-7b`) are `mysproj.models.presets.build_random_llava`'s; CLIP presets are
`mysproj.models.clip.write_random_clip`'s. The 7B model is built directly on the GPU when there is one (a CPU
initialises 7B parameters slowly) and written from there in safetensors shards, straight into the output folder
when it is local. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import dataclasses
import logging

from mysproj.models.clip import write_random_clip
from mysproj.models.presets import PRESETS, build_random_llava, llava_config
from mysproj.models.saving import save_hf_model
from mysproj.storage.manifest import StageOutput, run_stage

log = logging.getLogger(__name__)
CLIP_PRESETS = ("clip-tiny", "clip-vit-l-14-336")


def run(cfg) -> dict:
    if cfg.preset in CLIP_PRESETS:
        def clip_body(out: StageOutput) -> dict:
            # write_random_clip reads out.cfg.dtype as a torch dtype name. Resolve "auto" here, not before
            # run_stage: the manifest's config hash must be that of the requested config, or a re-run never skips.
            if cfg.dtype == "auto":
                out.cfg = dataclasses.replace(cfg, dtype="float32")
            summary = dict(write_random_clip(cfg.preset, out) or {})
            summary.update(preset=cfg.preset, random_weights=True)
            return summary

        return run_stage("model-init", cfg, clip_body)

    def body(out: StageOutput) -> dict:
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cfg.preset == "llava-1.5-7b" else "float32")

        model, tokenizer, processor = build_random_llava(cfg.preset, cfg.seed, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model-init: %s, %.1fM parameters (random), writing %s", cfg.preset, n_params / 1e6, out.uri)
        with out.staging() as tmp:  # the weights go to the CPU a shard at a time, straight from the model
            save_hf_model(model.state_dict(), _config_of(cfg.preset, tokenizer), tokenizer, processor, tmp,
                          on_file=out.sender(tmp))
            del model
            out.put_dir(tmp, move=True)
        return {"preset": cfg.preset, "random_weights": True, "parameters": n_params, "dtype": dtype,
                "layout": "hf"}

    return run_stage("model-init", cfg, body)


def _config_of(preset_name: str, tokenizer):
    return llava_config(PRESETS[preset_name], tokenizer)
