"""Stage `merge`: a tuned projector put back into its base model (the seed's update_model.sh, done right).

Writes an HF-layout model (safetensors, config, tokenizer, processor) that `LlavaForConditionalGeneration
.from_pretrained` loads, plus `mm_projector.bin` in the original key names. The projector is the tuned one (cast
to the base's dtype); every other tensor is the base's, bit for bit. The base may be in either layout; the
projector may be a `finetune --strategy projector` output or a bare `mm_projector.bin` / `projector.safetensors`.
"""

from __future__ import annotations

import logging
import os
import tempfile

from mysproj.errors import BadInput
from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.manifest import MANIFEST, StageInput, StageOutput, run_stage

log = logging.getLogger(__name__)


def read_projector(uri: str) -> dict:
    """Projector tensors under HF names from a finetune output or a bare weights file."""
    import torch
    from safetensors.torch import load_file

    from mysproj.models.conversion import projector_to_hf

    uri = str(uri).rstrip("/")
    inp = StageInput.if_complete(uri, expect_stage="finetune")
    if inp is not None:
        if "projector.safetensors" not in inp.files:
            raise BadInput(f"{uri}: finetune output has no projector.safetensors (strategy "
                           f"{inp.manifest.get('summary', {}).get('strategy')}); merge needs a projector fine-tune")
        path = inp.local_path("projector.safetensors")
        safetensors = True  # the cached copy of a remote file has no extension
    elif uri.endswith((".bin", ".safetensors", ".pt")):
        path = _bare_projector_file(uri)
        safetensors = uri.endswith(".safetensors")
    else:
        raise BadInput(f"{uri}: not a finetune output (no _SUCCESS.json) nor a mm_projector.bin / "
                       f"projector.safetensors file")
    try:
        sd = load_file(path) if safetensors else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        raise BadInput(f"{uri}: cannot read projector weights ({type(e).__name__}: {e})") from None
    try:
        return projector_to_hf(sd)
    except KeyError as e:
        raise BadInput(f"{uri}: {e.args[0]}") from None


# What a fine-tune leaves in its output folder before its manifest: a projector file next to these is unfinished.
_FINETUNE_MARKS = ("metrics.jsonl", "checkpoints", "_FAILURE.json")


def _bare_projector_file(uri: str) -> str:
    """A local, checked copy of a projector file given by itself. Inside a complete stage output it is verified by
    that output's manifest; inside an unfinished fine-tune (no manifest yet) it is refused."""
    from mysproj.models.integrity import check_weights_file

    folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    parent = StageInput.if_complete(folder)
    if parent is not None:
        return parent.local_path(name)
    if any(U.exists(U.join(folder, mark)) for mark in _FINETUNE_MARKS):
        raise BadInput(f"{uri}: inside an unfinished fine-tune output ({folder} has no {MANIFEST}); let the "
                       f"fine-tune finish (re-running it resumes it) and pass {folder}")
    if not U.exists(uri):
        raise BadInput(f"{uri}: no such projector file")
    path = cache.fetch(uri)
    check_weights_file(path, uri)
    log.warning("%s has no %s beside it: used as a projector from outside mysproj (checked: complete)", uri,
                MANIFEST)
    return path


def merge(cfg, out: StageOutput) -> dict:
    import torch

    from mysproj.models.conversion import PROJECTOR_HF_TO_ORIGINAL
    from mysproj.models.loading import load_llava
    from mysproj.models.saving import save_hf_model

    projector = read_projector(cfg.projector)
    base = load_llava(cfg.base, dtype="auto")
    state = base.model.state_dict()
    for name, tensor in projector.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise BadInput(f"{cfg.projector}: projector {name} has shape {tuple(tensor.shape)}, the base model's is "
                           f"{tuple(state[name].shape)}; was it trained on another base?")
        state[name] = tensor.to(state[name].dtype)
    with tempfile.TemporaryDirectory(prefix="mysproj-merge-") as tmp:
        save_hf_model(state, base.model.config, base.tokenizer, base.image_processor, tmp)
        torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: v.to(state[k].dtype) for k, v in projector.items()},
                   os.path.join(tmp, "mm_projector.bin"))
        out.put_dir(tmp)
    return {"base": cfg.base, "projector": cfg.projector, "base_layout": base.layout,
            "random_weights": base.random_weights, "replaced": sorted(projector), "layout": "hf"}


def run(cfg) -> dict:
    return run_stage("merge", cfg, lambda out: merge(cfg, out))
