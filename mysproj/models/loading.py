"""Load a LLaVA-1.5 model from a path or URI, in either layout, as `LlavaForConditionalGeneration`.

Accepted: an HF-layout folder (llava-hf/llava-1.5-7b-hf), an original LLaVA folder (liuhaotian/llava-v1.5-7b:
`LlavaLlamaForCausalLM` config with `mm_*` keys; the CLIP tower in a separate folder given by `vision_tower=`,
or by the config's `mm_vision_tower` when that names an existing path, absolute or relative to the model folder),
and stage outputs (`model-init`, `merge`, `finetune` full/lora) whose model files sit next to `_SUCCESS.json`.
Weights are read only from safetensors or with `torch.load(weights_only=True)`; no remote code, no hub.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from mysproj.config.registry import stages_where, summary_of
from mysproj.config.summaries import FinetuneSummary, ModelSummary
from mysproj.errors import BadInput
from mysproj.models import conversion
from mysproj.models.conversion import legacy_to_current
from mysproj.models.integrity import check_model_folder
from mysproj.models.original_layout import convert_original, read_model_config
from mysproj.models.stream_load import read_state_dict
from mysproj.models.weights_io import open_weights, weight_files
from mysproj.storage import cache, s3_transfer
from mysproj.storage import uri as U
from mysproj.storage.manifest import MANIFEST, StageInput

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"


@dataclass
class LoadedLlava:
    model: Any
    tokenizer: Any
    image_processor: Any
    random_weights: bool
    source: str
    layout: str = "hf"


def materialize(uri: str) -> tuple[str, ModelSummary]:
    """(local folder with the model files, its manifest's summary; an empty one for a plain folder). Stage
    outputs: only root-level files, each verified against the manifest; plain folders: everything under them."""
    uri = str(uri).rstrip("/")
    inp = StageInput.if_complete(uri, expect_stage=stages_where("model"))
    if inp is not None:
        summary = summary_of(inp.manifest)
        if isinstance(summary, FinetuneSummary) and summary.strategy == "projector":
            raise BadInput(f"{uri} is a projector-only fine-tune (no full model): merge it into its base first "
                           f"with `mysproj merge --base BASE --projector {uri} --out URI`")
        names = sorted(n for n in inp.files if "/" not in n and n != MANIFEST)
        if "config.json" not in names:
            raise BadInput(f"{uri}: its {inp.manifest['stage']} output holds no model (no config.json); "
                           f"a CLIP preset? LLaVA stages need a LLaVA model")
        return inp.local_dir(names=names), summary
    if U.is_local(uri):
        folder = U.local_path(uri)
        if not os.path.isdir(folder):
            raise BadInput(f"{uri}: no such model folder")
    else:
        folder = cache.fetch_folder(uri)
        if folder is None:
            raise BadInput(f"{uri}: no such model folder (nothing stored under it)")
    check_model_folder(folder, uri)
    return folder, ModelSummary()


def hf_model_output(uri: str) -> StageInput | None:
    """The model stage output at `uri` when it is in the HF layout with safetensors weights (config.json and an
    index or model.safetensors), else None."""
    inp = StageInput.if_complete(str(uri).rstrip("/"), expect_stage=stages_where("model"))
    if inp is None or getattr(summary_of(inp.manifest), "layout", None) != "hf" or "config.json" not in inp.files:
        return None
    return inp if INDEX in inp.files or "model.safetensors" in inp.files else None


def is_original_layout(config: dict) -> bool:
    archs = config.get("architectures") or []
    return "mm_projector_type" in config or "mm_vision_tower" in config or any("LlavaLlama" in a for a in archs) \
        or config.get("model_type") in ("llava_llama", "llava_mistral")


def read_weights(folder: str, what: str) -> dict:
    """Every tensor in a folder's safetensors files, else its `pytorch_model*.bin` (weights_only)."""

    out = {}
    for path in weight_files(folder, what):
        with open_weights(path, f"{what.rstrip('/')}/{os.path.basename(path)}") as f:
            out.update({k: f.get(k) for k in f.keys()})
    return out


def _has_weights(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.safetensors")) or glob.glob(os.path.join(folder, "*.bin")))


def load_llava(uri: str, *, device: str = "cpu", dtype=None, vision_tower: str | None = None,
               direct: bool = False) -> LoadedLlava:
    """The model (eval mode, on `device`, in `dtype` or the stored dtype), tokenizer and image processor.
    `direct` (HF layout): the weights are read from safetensors straight onto `device`, without a CPU copy of the
    whole model first."""

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    streamed = streamable(uri)
    if streamed is not None:
        return load_streamed(streamed, device=device, dtype=None if dtype == "auto" else dtype)
    folder, summary = materialize(uri)
    config = read_model_config(folder, uri)
    if is_original_layout(config):
        model, tokenizer, processor = load_original(folder, config, vision_tower, uri)
        if dtype is not None and dtype != "auto":
            model = model.to(dtype)
        _record_dtype(model)
        layout = "original"
    else:
        if not _has_weights(folder):
            raise BadInput(f"{uri}: no model weights (*.safetensors or pytorch_model*.bin) next to config.json")
        if config.get("model_type") != "llava":
            raise BadInput(f"{uri}: config.json model_type is '{config.get('model_type')}', not a LLaVA model")
        placement = {"device_map": device} if direct else {}
        try:
            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype or "auto",
                                                                  local_files_only=True, trust_remote_code=False,
                                                                  **placement)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:  # a local folder: what fails here fails again on a retry
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise BadInput(f"{uri}: cannot load the model ({type(e).__name__}: {first}); is the folder "
                           f"complete?") from None
        layout = "hf"
    model = model.to(device).eval()
    return LoadedLlava(model, tokenizer, processor, summary.random_weights, str(uri), layout)


def streamable(uri: str) -> StageInput | None:
    """The HF-layout model stage output at an s3 `uri`, whose weights `load_streamed` reads without a local copy;
    None for anything else (loaded through the local cache), and in a run of several processes on one machine (the
    ranks of a fine-tuning), which share one cached copy instead of each holding and fetching its own."""
    if not s3_transfer.is_s3(uri) or int(os.environ.get("LOCAL_WORLD_SIZE") or 1) > 1:
        return None
    inp = hf_model_output(uri)
    return inp if inp is not None and any(n.endswith(".safetensors") and "/" not in n for n in inp.files) else None


def load_streamed(inp: StageInput, *, device: str = "cpu", dtype=None) -> LoadedLlava:
    """`load_llava` of an HF-layout stage output in S3: the weights streamed into memory and straight onto
    `device` (`mysproj.models.stream_load`), the model built around them without another copy."""

    names = sorted(n for n in inp.files if "/" not in n and n != MANIFEST)
    weights = [n for n in names if n.endswith(".safetensors")]
    folder = inp.local_dir(names=[n for n in names if n not in weights and not n.endswith((".bin", ".jsonl"))])
    config = read_model_config(folder, inp.uri)
    if config.get("model_type") != "llava":
        raise BadInput(f"{inp.uri}: config.json model_type is '{config.get('model_type')}', not a LLaVA model")
    state, _ = read_state_dict(inp, weights, device=device, dtype=dtype)
    hf_config = LlavaConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    try:
        model.load_state_dict(legacy_to_current(state), strict=True, assign=True)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise BadInput(f"{inp.uri}: its weights do not fit its config.json ({first})") from None
    del state
    _tie_buffers(model)
    if os.path.exists(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    _record_dtype(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = model.to(device).eval()
    summary = inp.manifest.get("summary", {})
    return LoadedLlava(model, tokenizer, processor, bool(summary.get("random_weights", False)), inp.uri, "hf")


def _find_vision_tower(folder: str, config: dict, vision_tower: str | None, what: str) -> str:
    if vision_tower:
        local, _ = materialize(vision_tower)
        return local
    name = config.get("mm_vision_tower") or config.get("vision_tower") or ""
    for cand in (name, os.path.join(folder, name), os.path.join(folder, "vision_tower")):
        if cand and os.path.isdir(cand) and os.path.exists(os.path.join(cand, "config.json")):
            return cand
    raise BadInput(f"{what}: original LLaVA layout needs its CLIP vision tower (mm_vision_tower '{name}'): pass its "
                   f"folder (e.g. a local copy of openai/clip-vit-large-patch14-336) as the vision tower")


def load_original(folder: str, config: dict, vision_tower: str | None, what: str):
    """Convert an original LLaVA folder exactly as transformers' `convert_llava_weights_to_hf.py` does (see
    `original_layout`; `stage_llava` writes the same conversion to safetensors)."""


    tower_dir = _find_vision_tower(folder, config, vision_tower, what)
    conv = convert_original(folder, config, tower_dir, what)  # names and shapes checked against the architecture
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(conv.config)
    model.load_state_dict(dict(conv.plan.tensors()), strict=True, assign=True)
    _tie_buffers(model)
    return model, conv.tokenizer, conv.image_processor


def _record_dtype(model) -> None:
    """The dtype in the configs, as `from_pretrained` records it (a staged copy then has the same config)."""
    dtype = model.get_input_embeddings().weight.dtype
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg.dtype = dtype


def _tie_buffers(model) -> None:
    """Non-persistent buffers (rotary inv_freq, CLIP position ids) are not in checkpoints: take them from a fresh
    instance of the owning module (built from its config on the CPU)."""
    for module in model.modules():
        meta = [b for b, buf in module.named_buffers(recurse=False) if buf.device.type == "meta"]
        if not meta:
            continue
        fresh = type(module)(module.config)
        for bname in meta:
            module.register_buffer(bname, getattr(fresh, bname), persistent=False)


def original_config(hf_config) -> dict:
    """An original-layout `config.json` (LlavaLlamaForCausalLM) for an HF LlavaConfig."""
    text = hf_config.text_config.to_dict()
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "_name_or_path"):
        text.pop(k, None)
    return {**text, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": hf_config.vision_config.hidden_size,
            "mm_vision_select_layer": hf_config.vision_feature_layer,
            "mm_vision_select_feature":
                "patch" if hf_config.vision_feature_select_strategy == "default" else "cls_patch",
            "mm_vision_tower": "vision_tower", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "freeze_mm_mlp_adapter": False,
            "tune_mm_mlp_adapter": False, "use_mm_proj": True}


def write_original(state_dict: dict, hf_config, tokenizer, image_processor, out_dir: str, *,
                   bin_shards: int = 0) -> None:
    """Write an HF-layout state dict in the original LLaVA layout: the LLaVA folder (config, tokenizer,
    `model.safetensors`, `mm_projector.bin`) and its CLIP tower in `vision_tower/`. `bin_shards`: the weights as
    released instead, torch pickles `pytorch_model-0000i-of-0000n.bin` (+ index) and
    `vision_tower/pytorch_model.bin`."""

    main, tower = conversion.split_original(conversion.hf_to_original(state_dict))
    os.makedirs(os.path.join(out_dir, "vision_tower"), exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(original_config(hf_config), f, indent=2)
    if bin_shards:
        names = list(main)
        per = -(-len(names) // bin_shards)
        files = [f"pytorch_model-{i + 1:05d}-of-{bin_shards:05d}.bin" for i in range(bin_shards)]
        weight_map = {}
        for i, fname in enumerate(files):
            part = {k: main[k].clone() for k in names[i * per:(i + 1) * per]}
            torch.save(part, os.path.join(out_dir, fname))
            weight_map.update(dict.fromkeys(part, fname))
        with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in main.values())}, "weight_map": weight_map},
                      f, indent=2)
        torch.save({k: v.clone() for k, v in tower.items()}, os.path.join(out_dir, "vision_tower", "pytorch_model.bin"))
    else:
        save_file({k: v.contiguous() for k, v in main.items()}, os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in tower.items()},
                  os.path.join(out_dir, "vision_tower", "model.safetensors"), metadata={"format": "pt"})
    torch.save({k: v for k, v in main.items() if "mm_projector" in k}, os.path.join(out_dir, "mm_projector.bin"))
    tokenizer.save_pretrained(out_dir)
    vision = hf_config.vision_config.to_dict()
    vision["architectures"] = ["CLIPVisionModel"]
    with open(os.path.join(out_dir, "vision_tower", "config.json"), "w") as f:
        json.dump(vision, f, indent=2)
    image_processor.save_pretrained(os.path.join(out_dir, "vision_tower"))
