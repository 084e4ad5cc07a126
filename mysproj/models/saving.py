"""Writing an HF-layout LLaVA folder (what `LlavaForConditionalGeneration.from_pretrained` and `load_llava` read):
`config.json`, safetensors shards (+ index when sharded), tokenizer, image processor and processor config.

Weights are written from a state dict, not a model instance, so a merge or a ZeRO-3 export never needs a second
copy of the model, and untouched tensors are written byte-for-byte as read.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlavaProcessor

SHARD_BYTES = 5 * 1024**3
# Tensors that a later stage replaces on their own (merge: the tuned projector) get a shard of their own in a sharded
# model, so that replacing them rewrites a few MB and the other shards can be reused as they are.
OWN_SHARD_PREFIX = "model.multi_modal_projector."


def save_state_dict(state_dict: dict, out_dir: str, max_shard_bytes: int | None = None, dtype=None,
                    on_file=None) -> list[str]:
    """Safetensors shards named like transformers' (`model.safetensors` or `model-0000i-of-0000n.safetensors`).
    Tensors move to the CPU one shard at a time, so a model on the GPU never needs a whole CPU copy; `dtype`:
    floating-point tensors are cast to it on their own device first (half the bytes to move for fp32 weights).
    `on_file(path)`: called as each shard is complete (`StageOutput.sender`: its upload starts while the next is
    written)."""

    max_shard_bytes = max_shard_bytes or SHARD_BYTES
    os.makedirs(out_dir, exist_ok=True)

    def stored(t):
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

    def size_of(t) -> int:
        return t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())

    nbytes = {k: size_of(t) for k, t in state_dict.items()}
    sharded = sum(nbytes.values()) > max_shard_bytes
    shards: list[list[str]] = [[]]
    size, previous = 0, None
    for name in sorted(state_dict):
        own = name.startswith(OWN_SHARD_PREFIX)
        boundary = sharded and previous is not None and own != previous
        if shards[-1] and (size + nbytes[name] > max_shard_bytes or boundary):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
        previous = own

    def write(names: list[str], fname: str) -> None:
        save_file({k: stored(state_dict[k]).to("cpu").contiguous() for k in names}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        if on_file is not None:
            on_file(os.path.join(out_dir, fname))

    if len(shards) == 1:
        write(shards[0], "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for names, fname in zip(shards, files):
        write(names, fname)
    index = {"metadata": {"total_size": sum(nbytes.values())},
             "weight_map": {k: fname for names, fname in zip(shards, files) for k in names}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return files


def replace_tensors(src: str, dst: str, replacements: dict) -> dict:
    """Safetensors file `dst` = `src` with the tensors named in `replacements` replaced (cast to `src`'s dtypes);
    every other tensor and the header metadata as stored. Returns {replaced name: its dtype in `src`}."""

    with safe_open(src, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dtypes = {name: tensors[name].dtype for name in replacements}
    for name, t in replacements.items():
        tensors[name] = t.detach().to("cpu", dtypes[name]).contiguous()
    save_file(tensors, dst, metadata=metadata)
    return dtypes


def save_processing(tokenizer, image_processor, config, out_dir: str) -> None:
    """Tokenizer, CLIP image processor and a `LlavaProcessor` config, as llava-hf ships them."""

    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)


def save_hf_model(state_dict: dict, config, tokenizer, image_processor, out_dir: str,
                  extra_config: dict | None = None, dtype=None, on_file=None) -> None:
    """A complete HF-layout model folder (`dtype`, `on_file`: as in `save_state_dict`)."""
    os.makedirs(out_dir, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    dtypes = {dtype or t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = str(next(iter(dtypes))).replace("torch.", "")
    for k, v in (extra_config or {}).items():
        setattr(config, k, v)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out_dir)
    save_state_dict(state_dict, out_dir, dtype=dtype, on_file=on_file)
    save_processing(tokenizer, image_processor, config, out_dir)
