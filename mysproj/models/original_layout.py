"""The original LLaVA layout (liuhaotian/llava-v1.5-7b: `LlavaLlamaForCausalLM` config with `mm_*` keys, its CLIP
tower in a folder of its own) as an HF `LlavaConfig` plus a stream of HF-named tensors read one input file at a
time. `load_llava` loads from it and `stage_llava` writes it to safetensors: one conversion, so a staged folder
loads to exactly the tensors the original folder loads to.

The conversion is transformers' `convert_llava_weights_to_hf.py`: keys mapped by `conversion`, `lm_head` from the
embedding where a checkpoint has none, `<image>`/`<pad>` added to the tokenizer and the embedding rows padded to a
multiple of 64, the new rows sampled (seeded) from N(mean, 1e-5 * cov) of the old ones. The CLIP tower's floating
point weights are cast to the checkpoint's dtype (the embedding's), as LLaVA's own model builder casts the tower
it loads, so the model has one dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mysproj.errors import BadInput
from mysproj.models import conversion
from mysproj.models.presets import image_processor as default_processor
from mysproj.models.presets import pad_vocab
from mysproj.models.tokenizer import IMAGE_TOKEN, ensure_llava_tokens
from mysproj.models.weights_io import aligned_order, open_weights, specs_of, weight_files

EMBED = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def read_model_config(folder: str, what: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise BadInput(f"{what}: no config.json; expected an HF-layout or original LLaVA model folder")
    with open(path) as f:
        return json.load(f)


def _vision_config(tower_dir: str):
    cfg = read_model_config(tower_dir, tower_dir)
    cfg = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    keep = {k: v for k, v in cfg.items() if k in CLIPVisionConfig().to_dict() and k not in ("model_type",)}
    return CLIPVisionConfig(**keep)


def _text_config(config: dict):
    known = LlamaConfig().to_dict()
    skip = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype"}
    keep = {k: v for k, v in config.items() if k in known and k not in skip}
    keep["tie_word_embeddings"] = False
    return LlamaConfig(**keep)


@dataclass
class Entry:
    name: str               # HF (transformers 5) name
    file: int               # index into TensorPlan.files
    key: str                # name stored in that file
    shape: tuple
    dtype: Any              # as written/loaded (the stored one, or the cast)
    rows: str | None = None  # "in"/"out": new token rows appended (embedding / lm_head)
    copy: bool = False      # a second tensor from the same stored one (lm_head from the embedding)


@dataclass
class TensorPlan:
    """Which stored tensor becomes which HF tensor, with final shapes and dtypes known before any is read."""
    files: list[tuple[str, str]]                      # (path, name used in errors), in reading order
    entries: list[Entry]                              # in stream order (by file)
    extra_rows: dict = field(default_factory=dict)    # {"in": rows, "out": rows}

    def tensors(self):
        """(name, tensor) pairs, one input file open at a time."""

        for i, (path, what) in enumerate(self.files):
            mine = [e for e in self.entries if e.file == i]
            if not mine:
                continue
            with open_weights(path, what) as f:
                for e in mine:
                    t = f.get(e.key)
                    if t.dtype != e.dtype:
                        t = t.to(e.dtype)
                    if e.rows:
                        t = torch.cat([t, self.extra_rows[e.rows]])
                    elif e.copy:
                        t = t.clone()
                    yield e.name, t


def plan_files(files: list[tuple[str, str]], rename, cast=None) -> TensorPlan:
    """A plan over weights files: `rename(stored key)` -> HF name or None (skipped); `cast(name, dtype)` -> dtype."""
    entries, seen = [], {}
    for i, (path, what) in enumerate(files):
        with open_weights(path, what) as f:
            specs = specs_of(f)
        for key in aligned_order(specs):  # any order within a file: stored tensors then start 64-byte aligned
            shape, dtype = specs[key]
            name = rename(key)
            if name is None:
                continue
            if name in seen:
                raise BadInput(f"{what}: tensor {key} is {name}, which {seen[name]} holds already")
            seen[name] = what
            entries.append(Entry(name, i, key, shape, cast(name, dtype) if cast else dtype))
    return TensorPlan(files, entries)


def weights_in(folder: str, what: str) -> list[tuple[str, str]]:
    return [(p, f"{what.rstrip('/')}/{os.path.basename(p)}") for p in weight_files(folder, what)]


def new_token_rows(emb, rows: int):
    """(embedding rows, lm_head rows) for the `rows - len(emb)` new tokens, as transformers' LLaVA conversion
    samples them (seeded, so a conversion is reproducible)."""

    n = emb.shape[0]
    mu = emb.float().mean(0)
    centred = emb.float() - mu
    sigma = centred.T @ centred / n
    dist = torch.distributions.multivariate_normal.MultivariateNormal(mu, covariance_matrix=1e-5 * sigma)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        new_in = torch.stack([dist.sample() for _ in range(rows - n)])
        new_out = torch.stack([dist.sample() for _ in range(rows - n)])
    return new_in.to(emb.dtype), new_out.to(emb.dtype)


@dataclass
class OriginalConversion:
    config: Any             # the HF LlavaConfig of the converted model
    tokenizer: Any
    image_processor: Any
    plan: TensorPlan


def convert_original(folder: str, config: dict, tower_dir: str, what: str) -> OriginalConversion:
    """The conversion of an original-layout folder (`config`: its config.json) with its CLIP tower folder. Every
    weights file is opened (pickles checked) and the names and shapes checked against the architecture before
    any tensor is read."""

    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise BadInput(f"{what}: mm_projector_type '{config['mm_projector_type']}' is not LLaVA-1.5's mlp2x_gelu")
    plan = plan_files(weights_in(folder, what), conversion.original_name_to_hf)
    if not any(e.key.startswith("model.vision_tower.vision_tower.") for e in plan.entries):
        def tower_name(key):
            name = conversion.clip_vision_name_to_original(key)
            return None if name is None else conversion.original_name_to_hf(name)

        tower = plan_files(weights_in(tower_dir, tower_dir), tower_name)
        base = len(plan.files)
        plan.files += tower.files
        plan.entries += [Entry(e.name, e.file + base, e.key, e.shape, e.dtype) for e in tower.entries]
    by_name = {e.name: e for e in plan.entries}
    if EMBED not in by_name:
        raise BadInput(f"{what}: its weights hold no model.embed_tokens.weight; is it a LLaVA checkpoint?")
    embed = by_name[EMBED]
    if LM_HEAD not in by_name:  # tied in the checkpoint: the conversion gives lm_head a copy
        at = plan.entries.index(embed) + 1
        plan.entries.insert(at, Entry(LM_HEAD, embed.file, embed.key, embed.shape, embed.dtype, copy=True))
    for e in plan.entries:  # one dtype: the tower's is cast to the checkpoint's
        if e.dtype.is_floating_point and e.dtype != embed.dtype:
            e.dtype = embed.dtype

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    ensure_llava_tokens(tokenizer)
    text = _text_config(config)
    old_rows = embed.shape[0]
    text.vocab_size = old_rows
    if text.pad_token_id is not None and text.pad_token_id >= old_rows:
        text.pad_token_id = None  # the stored ids refer to the vocabulary after the <image>/<pad> extension
    if len(tokenizer) > old_rows:
        rows = pad_vocab(len(tokenizer))
        path, fwhat = plan.files[embed.file]
        with open_weights(path, fwhat) as f:
            plan.extra_rows["in"], plan.extra_rows["out"] = new_token_rows(f.get(embed.key).to(embed.dtype), rows)
        for e in plan.entries:
            if e.name in (EMBED, LM_HEAD):
                e.rows = "in" if e.name == EMBED else "out"
                e.shape = (rows, *e.shape[1:])
        text.vocab_size = rows
    vision = _vision_config(tower_dir)
    llava_cfg = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if config.get("mm_vision_select_feature", "patch") == "patch"
        else "full",
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    check_architecture(plan, llava_cfg, what)
    proc_file = os.path.join(tower_dir, "preprocessor_config.json")
    processor = CLIPImageProcessor.from_pretrained(tower_dir) if os.path.exists(proc_file) \
        else default_processor(vision.image_size)
    return OriginalConversion(llava_cfg, tokenizer, processor, plan)


def check_architecture(plan: TensorPlan, llava_cfg, what: str) -> None:
    """The plan's names and shapes are exactly the parameters of the model `llava_cfg` describes."""

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {e.name: tuple(e.shape) for e in plan.entries}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("shape differs", [f"{k} {got[k]} vs {want[k]}" for k in wrong])) if names]
        raise BadInput(f"{what}: weights do not match the LLaVA-1.5 architecture in its config ({'; '.join(parts)})")
