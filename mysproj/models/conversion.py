"""Original LLaVA layout (liuhaotian/llava-v1.5-7b + a separate CLIP tower) <-> HF layout (llava-hf), docs/paper.md.

Original keys: `model.mm_projector.{0,2}.*`, `model.vision_tower.vision_tower.vision_model.*`, `model.layers.*`,
`model.embed_tokens.*`, `model.norm.*`, `lm_head.*`. transformers' `convert_llava_weights_to_hf.py` maps them
with `KEYS_TO_MODIFY_MAPPING` (substring replacements, in order) to the legacy llava-hf keys
(`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`); transformers 5
loads those through its checkpoint conversion mapping into the current module tree (`model.language_model.*`,
`model.vision_tower.*` with the CLIP `vision_model.` prefix removed, `model.multi_modal_projector.*`, `lm_head.*`).
Both steps are reproduced here and tested against transformers' own loader.
"""

from __future__ import annotations

import re

# Verbatim from transformers/models/llava/convert_llava_weights_to_hf.py (applied in this order, every match).
KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.": "",
    ".vision_resampler": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}

# transformers 5 conversion mapping for `llava` + `CLIPVisionModel` (legacy llava-hf keys -> module tree).
_LEGACY_TO_CURRENT = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]

# Projector parameter names: original LLaVA (`mm_projector.bin`) <-> HF module tree.
PROJECTOR_ORIGINAL_TO_HF = {
    "model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
    "model.mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",
    "model.mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",
    "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
}
PROJECTOR_HF_TO_ORIGINAL = {v: k for k, v in PROJECTOR_ORIGINAL_TO_HF.items()}

CLIP_NON_VISION = ("text_model.", "text_projection", "visual_projection", "logit_scale")


def original_to_legacy_hf(state_dict: dict) -> dict:
    """transformers' `convert_state_dict_to_hf` + the `load_original_state_dict` fix-ups (lm_head, image_newline)."""
    sd = dict(state_dict)
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    out = {}
    for key, value in sd.items():
        name = legacy_hf_name(key)
        if name is not None:
            out[name] = value
    return out


def legacy_hf_name(key: str) -> str | None:
    """An original key's legacy llava-hf name; None for what the HF model does not hold (rotary `inv_freq`
    buffers, `model.image_newline`)."""
    if key.endswith(".inv_freq") or key == "model.image_newline":
        return None
    for old, new in KEYS_TO_MODIFY_MAPPING.items():
        if old in key:
            key = key.replace(old, new)
    return key


def original_name_to_hf(key: str) -> str | None:
    """An original key's transformers 5 module name (None: not part of the HF model)."""
    name = legacy_hf_name(key)
    return None if name is None else current_name(name)


def current_name(key: str) -> str:
    """A legacy llava-hf key's transformers 5 module name; a current name as it is."""
    for pattern, repl in _LEGACY_TO_CURRENT:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def legacy_to_current(state_dict: dict) -> dict:
    """Legacy llava-hf keys to transformers 5 module names; current names pass through unchanged."""
    return {current_name(key): value for key, value in state_dict.items()}


def original_to_hf(state_dict: dict) -> dict:
    return legacy_to_current(original_to_legacy_hf(state_dict))


def hf_to_original(state_dict: dict) -> dict:
    """HF (legacy or current keys) -> original LLaVA keys, vision tower included under
    `model.vision_tower.vision_tower.vision_model.*` (what the original model's `state_dict()` holds)."""
    out = {}
    for key, value in legacy_to_current(state_dict).items():
        if key in PROJECTOR_HF_TO_ORIGINAL:
            key = PROJECTOR_HF_TO_ORIGINAL[key]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            key = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key != "lm_head.weight":
            raise KeyError(f"unexpected LLaVA parameter {key}")
        out[key] = value
    return out


def clip_vision_name_to_original(key: str) -> str | None:
    """A CLIP checkpoint key's original LLaVA vision-tower name; None for the text tower, the projections and
    position-id buffers."""
    if key.startswith(CLIP_NON_VISION) or key.endswith(".position_ids"):
        return None
    return "model.vision_tower.vision_tower." + (key if key.startswith("vision_model.") else "vision_model." + key)


def split_original(state_dict: dict) -> tuple[dict, dict]:
    """(LLaVA checkpoint without the tower, CLIP vision checkpoint with `vision_model.*` keys), as released."""
    prefix = "model.vision_tower.vision_tower."
    main = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    tower = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return main, tower


def projector_to_hf(state_dict: dict) -> dict:
    """Projector weights in any naming (mm_projector.bin, `0.weight`, legacy or current HF) -> HF module names."""
    out = {}
    for key, value in state_dict.items():
        k = key
        m = re.search(r"(?:^|\.)(?:mm_projector\.)?([02])\.(weight|bias)$", k)
        if "mm_projector" in k or re.fullmatch(r"[02]\.(weight|bias)", k):
            if not m:
                raise KeyError(f"unexpected projector parameter {key}")
            k = f"model.mm_projector.{m.group(1)}.{m.group(2)}"
            k = PROJECTOR_ORIGINAL_TO_HF[k]
        else:
            k = current_name(k)
        if k not in PROJECTOR_HF_TO_ORIGINAL:
            raise KeyError(f"unexpected projector parameter {key}")
        out[k] = value
    if set(out) != set(PROJECTOR_HF_TO_ORIGINAL):
        missing = sorted(set(PROJECTOR_HF_TO_ORIGINAL) - set(out))
        raise KeyError(f"projector weights incomplete: missing {', '.join(missing)}")
    return out
