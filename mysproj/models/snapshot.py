"""A downloaded hub snapshot made into a self-contained safetensors model folder that every later stage loads
fast and without unpickling.

- `stage_llava`: an original-layout LLaVA (liuhaotian/llava-v1.5-7b, `.bin` or safetensors shards) with its CLIP
  tower folder, or an HF-layout LLaVA (llava-hf, `.bin` or safetensors) -> an HF-layout folder (config, tokenizer,
  image processor, processor config, `model.safetensors.index.json` + shards) that `load_llava` loads to exactly
  the tensors and config `load_llava(snapshot, vision_tower=tower)` gives (the same conversion:
  `original_layout`).
- `stage_clip`: an HF CLIP or open_clip folder -> the same folder with safetensors weights (keys unchanged).

Memory: the input is read one file at a time (pickles memory-mapped, `weights_only`; safetensors a tensor at a
time) and each output shard's header is written from the plan before its tensors, which are then written as they
are read: the peak is about one tensor (the largest, the 7B embedding or lm_head: 0.26 GB in fp16) plus the pages of
the input file being read, which the kernel can drop, never the model. The token rows LLaVA's conversion adds are
sampled from the embedding first (one tensor). Output shards keep the language model, the projector and the vision
tower apart (merge rewrites the projector's shard alone; the probe reads the tower and projector shards only).
Every input file is opened and its names and shapes checked before anything is written; on any failure what was
written is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from transformers import LlavaConfig

from mysproj.errors import BadInput
from mysproj.models.clip import _materialise
from mysproj.models.conversion import current_name
from mysproj.models.loading import _find_vision_tower, is_original_layout, materialize
from mysproj.models.original_layout import (
    TensorPlan,
    check_architecture,
    convert_original,
    plan_files,
    read_model_config,
    weights_in,
)
from mysproj.models.saving import OWN_SHARD_PREFIX, SHARD_BYTES, save_processing
from mysproj.models.weights_io import SafetensorsWriter, aligned_order, open_weights, specs_of, weight_files
from mysproj.storage.manifest import MANIFEST

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".ot", ".gguf")
_GROUPS = (OWN_SHARD_PREFIX, "model.vision_tower.")


def stage_llava(snapshot: str, out_dir: str, *, tower: str | None = None, max_shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the snapshot's model into `out_dir` (see the module docstring); returns the manifest summary."""

    folder, _ = materialize(snapshot)
    config = read_model_config(folder, snapshot)
    if is_original_layout(config):
        tower_dir = _find_vision_tower(folder, config, tower, snapshot)
        conv = convert_original(folder, config, tower_dir, snapshot)
        plan, source = conv.plan, "original"
    elif config.get("model_type") == "llava":
        plan = plan_files(weights_in(folder, snapshot), _hf_name)
        # from_pretrained would fill a missing tensor with random values and only warn: refuse it here
        check_architecture(plan, LlavaConfig.from_pretrained(folder, local_files_only=True), snapshot)
        conv, source = None, "hf"
    else:
        raise BadInput(f"{snapshot}: config.json model_type is '{config.get('model_type')}', not a LLaVA model")
    dtypes = sorted({str(e.dtype).replace("torch.", "") for e in plan.entries if e.dtype.is_floating_point})
    created = _prepare(out_dir)
    try:
        files = write_plan(plan, out_dir, max_shard_bytes)
        if conv is not None:
            _write_processing(conv, dtypes, out_dir)
        else:
            _copy_other_files(folder, out_dir)
    except BaseException:
        _remove(out_dir, created)
        raise
    summary = {"layout": "hf", "converted_from": source, "tensors": len(plan.entries),
               "bytes": sum(_nbytes(e) for e in plan.entries), "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
               "files": len(files), "random_weights": False}
    log.info("staged %s (%s layout) as %d safetensors shards, %.2f GB", snapshot, source, len(files),
             summary["bytes"] / 1e9)
    return summary


def _hf_name(key: str) -> str | None:
    """An HF-layout key's current module name; None for non-persistent buffers some checkpoints carry."""

    return None if key.endswith((".inv_freq", ".position_ids")) else current_name(key)


def _nbytes(e) -> int:
    return _nbytes_of(e.shape, e.dtype)


def _group(name: str) -> int:
    return next((i for i, p in enumerate(_GROUPS) if name.startswith(p)), len(_GROUPS))


def write_plan(plan: TensorPlan, out_dir: str, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """The plan's tensors as `model-0000i-of-0000n.safetensors` + index, shards filled in stream order within each
    group (language model / projector / vision tower), each written as its tensors arrive."""
    shards: list[list] = []
    open_shard: dict[int, tuple[int, int]] = {}  # group -> (shard number, bytes so far)
    where = {}
    for e in plan.entries:
        g, n = _group(e.name), _nbytes(e)
        cur = open_shard.get(g)
        if cur is None or (cur[1] + n > max_shard_bytes and shards[cur[0]]):
            shards.append([])
            cur = (len(shards) - 1, 0)
        shards[cur[0]].append(e)
        open_shard[g] = (cur[0], cur[1] + n)
        where[e.name] = cur[0]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    remaining = [len(s) for s in shards]
    writers: dict[int, SafetensorsWriter] = {}
    try:
        for name, tensor in plan.tensors():
            i = where[name]
            if i not in writers:
                writers[i] = SafetensorsWriter(os.path.join(out_dir, names[i]),
                                               [(e.name, e.shape, e.dtype) for e in shards[i]], {"format": "pt"})
            writers[i].add(name, tensor)
            del tensor
            remaining[i] -= 1
            if remaining[i] == 0:
                writers.pop(i).close()
    finally:
        for w in writers.values():
            w.abort()
    index = {"metadata": {"total_size": sum(_nbytes(e) for e in plan.entries)},
             "weight_map": {e.name: names[where[e.name]] for e in plan.entries}}
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return names


def _write_processing(conv, dtypes: list[str], out_dir: str) -> None:
    config = conv.config.__class__.from_dict(conv.config.to_dict())
    if len(dtypes) == 1:
        config.dtype = dtypes[0]  # `from_pretrained(dtype="auto")` loads in it, as the conversion gave it
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out_dir)
    save_processing(conv.tokenizer, conv.image_processor, config, out_dir)


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith((".bin.index.json", ".safetensors.index.json"))


def _copy_other_files(folder: str, out_dir: str) -> list[str]:
    """Top-level files other than weights (config, tokenizer, processor files), as they are."""

    copied = []
    for name in sorted(os.listdir(folder)):
        src = os.path.join(folder, name)
        if os.path.isfile(src) and not name.startswith(".") and name != MANIFEST and not _is_weights(name):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _prepare(out_dir: str) -> bool:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise BadInput(f"{out_dir}: not empty; stage a snapshot into a new or empty folder")
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return created


def _remove(out_dir: str, created: bool) -> None:
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _safetensors_name(name: str) -> str:
    """pytorch_model.bin -> model.safetensors, pytorch_model-00001-of-00002.bin -> model-00001-of-00002
    .safetensors, open_clip_pytorch_model.bin -> open_clip_model.safetensors (the names loaders look for)."""
    stem = name.rsplit(".", 1)[0]
    return stem.replace("pytorch_model", "model") + ".safetensors"


def stage_clip(snapshot: str, out_dir: str) -> dict:
    """An HF CLIP (`config.json` model_type clip) or open_clip (`open_clip_config.json`) folder with safetensors
    weights: each `.bin` written as a safetensors file of the same tensors under the same keys, one file at a time;
    config, processor and tokenizer files copied."""

    folder = _materialise(snapshot)
    if not os.path.isdir(folder):
        raise BadInput(f"CLIP model {snapshot}: expected a folder (HF CLIP or open_clip), got one file")
    if os.path.exists(os.path.join(folder, "open_clip_config.json")):
        kind = "open_clip"
        names = [n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if
                 os.path.isfile(os.path.join(folder, n))][:1]
        if not names:
            raise BadInput(f"CLIP model {snapshot}: open_clip_config.json but no open_clip_model.safetensors or "
                           f"open_clip_pytorch_model.bin")
        paths = [os.path.join(folder, names[0])]
    else:
        cfg_path = os.path.join(folder, "config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        if cfg.get("model_type") != "clip" and not any(a.startswith("CLIP") for a in cfg.get("architectures") or []):
            raise BadInput(f"CLIP model {snapshot}: expected an HF CLIP folder (config.json model_type clip) or an "
                           f"open_clip folder (open_clip_config.json)")
        kind = "hf"
        paths = weight_files(folder, f"CLIP model {snapshot}")
    created = _prepare(out_dir)
    tensors = nbytes = 0
    dtypes, renamed = set(), {}
    try:
        for path in paths:
            name = os.path.basename(path)
            renamed[name] = _safetensors_name(name) if name.endswith(".bin") else name
            with open_weights(path, f"{snapshot.rstrip('/')}/{name}") as f:
                specs = specs_of(f)
                _write_file(f, specs, os.path.join(out_dir, renamed[name]))
            tensors += len(specs)
            nbytes += sum(_nbytes_of(s, d) for s, d in specs.values())
            dtypes |= {str(d).replace("torch.", "") for _, d in specs.values() if d.is_floating_point}
        bin_index = os.path.join(folder, "pytorch_model.bin.index.json")
        if os.path.exists(bin_index) and not os.path.exists(os.path.join(folder, INDEX)):
            with open(bin_index) as f:
                idx = json.load(f)
            idx["weight_map"] = {k: renamed.get(v, v) for k, v in idx.get("weight_map", {}).items()}
            with open(os.path.join(out_dir, INDEX), "w") as f:
                json.dump(idx, f, indent=2)
        elif os.path.exists(os.path.join(folder, INDEX)):
            shutil.copyfile(os.path.join(folder, INDEX), os.path.join(out_dir, INDEX))
        _copy_other_files(folder, out_dir)
    except BaseException:
        _remove(out_dir, created)
        raise
    dtypes = sorted(dtypes)
    return {"layout": "clip", "kind": kind, "tensors": tensors, "bytes": nbytes,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "files": sorted(renamed.values()),
            "random_weights": False}


def _write_file(f, specs: dict, dst: str) -> None:
    order = aligned_order(specs)
    writer = SafetensorsWriter(dst, [(k, *specs[k]) for k in order], {"format": "pt"})
    try:
        for k in order:
            writer.add(k, f.get(k))
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _nbytes_of(shape, dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n
