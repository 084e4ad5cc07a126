"""Writing an HF-layout LLaVA folder (what `LlavaForConditionalGeneration.from_pretrained` and `load_llava` read):
`config.json`, safetensors shards (+ index when sharded), tokenizer, image processor and processor config.

Weights are written from a state dict, not a model instance, so a merge or a ZeRO-3 export never needs a second
copy of the model, and untouched tensors are written byte-for-byte as read.
"""

from __future__ import annotations

import json
import os

SHARD_BYTES = 5 * 1024**3


def save_state_dict(state_dict: dict, out_dir: str, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Safetensors shards named like transformers' (`model.safetensors` or `model-0000i-of-0000n.safetensors`)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        names.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return names


def save_processing(tokenizer, image_processor, config, out_dir: str) -> None:
    """Tokenizer, CLIP image processor and a `LlavaProcessor` config, as llava-hf ships them."""
    from transformers import LlavaProcessor

    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)


def save_hf_model(state_dict: dict, config, tokenizer, image_processor, out_dir: str,
                  extra_config: dict | None = None) -> None:
    """A complete HF-layout model folder."""
    os.makedirs(out_dir, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = str(next(iter(dtypes))).replace("torch.", "")
    for k, v in (extra_config or {}).items():
        setattr(config, k, v)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out_dir)
    save_state_dict(state_dict, out_dir)
    save_processing(tokenizer, image_processor, config, out_dir)
