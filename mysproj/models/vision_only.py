"""LLaVA's vision tower and projector alone, for the stages that need only image features (the probe): the
language model's weights (nearly all of a 7B model's bytes) are neither fetched, verified, read nor put on the GPU.

The model is built on the meta device and only the tensors under `model.vision_tower.` and
`model.multi_modal_projector.` are loaded, from the safetensors files that hold them (with mysproj's sharding the
projector and the tower sit in shards of their own), straight onto the device and cast there as `from_pretrained`
would cast them. The language model's parameters stay on the meta device: calling it fails loudly. Anything this
does not cover (a plain folder, the original layout, a missing tensor) returns None and the caller loads the
whole model.
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from mysproj.config.registry import summary_of
from mysproj.models.conversion import current_name
from mysproj.models.loading import INDEX, LoadedLlava, _tie_buffers, hf_model_output
from mysproj.models.stream_load import read_state_dict
from mysproj.storage import s3_transfer
from mysproj.storage.manifest import MANIFEST

log = logging.getLogger(__name__)
PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def _weight_files(inp) -> set[str]:
    """The safetensors files of a stage output that hold the tower or the projector."""
    if INDEX in inp.files:
        return {f for k, f in inp.read_json(INDEX)["weight_map"].items() if current_name(k).startswith(PREFIXES)}
    return {"model.safetensors"}


def load_vision(uri: str, *, device: str = "cpu", dtype=None):
    """A `LoadedLlava` whose model holds only its vision tower and projector (on `device`, in `dtype` or the
    stored dtype), or None where only the whole model can be loaded."""

    uri = str(uri).rstrip("/")
    inp = hf_model_output(uri)
    if inp is None:
        return None
    summary = summary_of(inp.manifest)
    needed = _weight_files(inp)
    if not needed:
        return None
    streamed = s3_transfer.is_s3(uri)  # the shards read straight into memory, not into the local cache
    names = [n for n in inp.files if "/" not in n and n != MANIFEST
             and (not n.endswith((".safetensors", ".bin")) or (n in needed and not streamed))]
    folder = inp.local_dir(names=names)
    config = LlavaConfig.from_pretrained(folder)
    if config.model_type != "llava":
        return None
    state = {}
    if streamed:
        got, _ = read_state_dict(inp, sorted(needed), device=str(device))
        state = {current_name(k): v for k, v in got.items() if current_name(k).startswith(PREFIXES)}
        del got
    for f in sorted(needed) if not streamed else []:
        with safe_open(os.path.join(folder, f), "pt", device=str(device)) as weights:
            state.update({current_name(k): weights.get_tensor(k) for k in weights.keys()
                          if current_name(k).startswith(PREFIXES)})
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    wanted = {k for k, _ in model.named_parameters() if k.startswith(PREFIXES)}
    if set(state) != wanted:
        log.info("vision-only load of %s: its weights do not match the vision tower and projector; loading the "
                 "whole model", uri)
        return None
    model.load_state_dict(state, strict=False, assign=True)
    parts = [model.model.vision_tower, model.model.multi_modal_projector]
    for part in parts:
        _tie_buffers(part)  # non-persistent buffers (CLIP's position ids) are not in the checkpoint
        part.to(device)
    model.to(dtype or next(iter(state.values())).dtype)  # the language model's meta tensors follow, as data-free
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return LoadedLlava(model.eval(), tokenizer, processor, summary.random_weights, uri, "hf")
