"""CLIP for the zero-shot baseline: random-weight presets written in open_clip's own folder layout, and one
loader for open_clip weights or a Hugging Face `CLIPModel` folder (run through transformers, as the released code's
`pipeline("zero-shot-image-classification")` does). Nothing is fetched from a hub.

    write_random_clip("clip-tiny", out)            # open_clip_config.json + open_clip_model.safetensors
    clip = load_clip("s3://.../models/clip-tiny")  # -> LoadedClip(model, preprocess, tokenizer, ...)
    img = clip.model.encode_image(batch, normalize=True); txt = clip.model.encode_text(clip.tokenizer(texts), ...)

Accepted layouts at a URI (a stage output, a local folder/file, or any fsspec folder):
- open_clip folder: `open_clip_config.json` (+ `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`);
- HF CLIP folder: `config.json` (model_type clip) + `model.safetensors` / `pytorch_model.bin`, tokenizer and
  `preprocessor_config.json` optional (open_clip's BPE tokenizer, the same vocabulary, is the fallback);
- one weights file: an OpenAI TorchScript archive (`ViT-L-14-336px.pt`) or an open_clip state dict of
  architecture `arch` (OpenAI-trained weights as a bare state dict need `ViT-L-14-336-quickgelu`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from mysproj.errors import BadInput
from mysproj.models.integrity import check_model_folder, check_weights_file
from mysproj.storage import cache, is_local, local_path, split
from mysproj.storage.manifest import StageInput

log = logging.getLogger(__name__)

# A CLIP small enough for CPU tests, built from a custom config; the text side keeps the real 49,408-token
# vocabulary and 77-token context so that open_clip's shipped BPE tokenizer works unchanged.
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PRESETS = {"clip-tiny": None, "clip-vit-l-14-336": "ViT-L-14-336"}  # preset -> built-in open_clip name
INFO_FILE = "mysproj_clip.json"


@dataclass
class LoadedClip:
    model: Any                      # .encode_image(pixels, normalize=True), .encode_text(tokens, normalize=True)
    preprocess: Callable            # PIL image -> [3, H, W] float tensor (CLIP resize + centre crop + normalise)
    tokenizer: Callable             # list[str] -> token id tensor
    kind: str                       # open_clip | hf
    source: str

    def __iter__(self):             # (model, preprocess, tokenizer) = load_clip(...)
        return iter((self.model, self.preprocess, self.tokenizer))


def write_random_clip(preset: str, out) -> dict:
    """Write a random-weight open_clip model of `preset` into the StageOutput `out`; returns the summary."""
    import open_clip  # noqa: PLC0415 - open_clip imports wandb (where installed) when imported: only where it is used

    if preset not in PRESETS:
        raise BadInput(f"unknown CLIP preset '{preset}'; known: {', '.join(PRESETS)}")
    seed = int(getattr(out.cfg, "seed", 0) or 0)
    dtype = getattr(torch, str(getattr(out.cfg, "dtype", "float32") or "float32"))
    name = PRESETS[preset]
    model_cfg = TINY_MODEL_CFG if name is None else open_clip.get_model_config(name)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f, indent=2)
        model = (open_clip.create_model(name, pretrained=None) if name
                 else open_clip.create_model(f"local-dir:{tmp}"))
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "open_clip_model.safetensors"))
        n_params = sum(p.numel() for p in model.parameters())
        info = {"kind": "open_clip", "preset": preset, "arch": name or "custom", "random_weights": True,
                "seed": seed, "parameters": n_params}
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        out.put_dir(tmp)
    log.info("clip preset %s: %.1fM random parameters", preset, n_params / 1e6)
    return dict(info)


def _materialise(uri: str) -> str:
    """A local file or folder with the model's bytes (stage outputs verified; remote folders cached)."""

    inp = StageInput.if_complete(uri)
    if inp is not None:
        return inp.local_dir()
    if is_local(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise BadInput(f"CLIP model {uri}: no such file or folder")
    else:
        fs, remote = split(uri)
        path = cache.fetch(uri) if fs.isfile(remote) else cache.fetch_folder(uri)
        if path is None:
            raise BadInput(f"CLIP model {uri}: nothing there")
    if os.path.isdir(path):
        check_model_folder(path, uri)
    else:
        check_weights_file(path, uri)
    return path


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def load_clip(uri: str, arch: str = "ViT-L-14-336", *, device: str = "cpu") -> LoadedClip:
    """Load CLIP from `uri` (see the module docstring for the layouts); the model is in eval mode on `device`."""
    import open_clip  # noqa: PLC0415 - open_clip imports wandb (where installed) when imported: only where it is used

    path = _materialise(uri)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "open_clip_config.json")):
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
            return LoadedClip(model.eval(), preprocess, tokenizer, "open_clip", uri)
        config = os.path.join(path, "config.json")
        if os.path.exists(config):
            with open(config) as f:
                cfg = json.load(f)
            if cfg.get("model_type") == "clip" or "CLIPModel" in (cfg.get("architectures") or []):
                return _load_hf(path, uri, device)
            if "llava" in str(cfg.get("model_type", "")).lower() or "mm_vision_tower" in cfg or \
                    any("Llava" in a for a in cfg.get("architectures") or []):
                raise BadInput(f"CLIP model {uri}: this is a LLaVA model; eval-clip needs a CLIP model (open_clip "
                               f"or HF CLIP)")
        weights = [n for n in sorted(os.listdir(path)) if n.endswith((".safetensors", ".bin", ".pt", ".pth"))]
        if len(weights) != 1:
            raise BadInput(f"CLIP model {uri}: expected open_clip_config.json, an HF CLIP config.json, or exactly "
                           f"one weights file; found {weights or 'none'}")
        path = os.path.join(path, weights[0])
    if _is_torchscript(path):
        model, preprocess = open_clip.load_openai_model(path, precision="fp32", device=device)
        return LoadedClip(model.eval(), preprocess, open_clip.get_tokenizer(arch), "open_clip", uri)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path, device=device)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise BadInput(f"CLIP model {uri}: weights do not fit open_clip architecture '{arch}' ({first}); "
                       f"pass the right --arch") from None
    return LoadedClip(model.eval(), preprocess, open_clip.get_tokenizer(arch), "open_clip", uri)


def _load_hf(path: str, uri: str, device: str) -> LoadedClip:
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    size = model.config.vision_config.image_size
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    else:  # CLIPImageProcessor's defaults are OpenAI CLIP's mean/std; resize shortest edge + centre crop
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def preprocess(img):
        return processor(images=img, return_tensors="pt")["pixel_values"][0]

    if any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json")):
        hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

        def tokenizer(texts):
            return hf_tok(list(texts), padding=True, truncation=True, return_tensors="pt")["input_ids"]
    else:
        import open_clip  # noqa: PLC0415 - open_clip imports wandb (where installed) when imported: only where it is used

        tokenizer = open_clip.get_tokenizer("ViT-L-14-336",
                                            context_length=model.config.text_config.max_position_embeddings)
    return LoadedClip(_HFClip(model, torch), preprocess, tokenizer, "hf", uri)


class _HFClip:
    """transformers' CLIPModel behind open_clip's encode_image/encode_text interface. Padding after the end
    token needs no attention mask: the text tower is causal and pools at the end token."""

    def __init__(self, model, torch):
        self.model, self._torch = model, torch
        self.logit_scale = model.logit_scale

    def _features(self, out):
        return out if isinstance(out, self._torch.Tensor) else out.pooler_output

    def encode_image(self, pixels, normalize: bool = False):
        feats = self._features(self.model.get_image_features(pixel_values=pixels))
        return self._torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens, normalize: bool = False):
        feats = self._features(self.model.get_text_features(input_ids=tokens))
        return self._torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()
        return self
