"""Stage `merge`: a tuned projector put back into its base model (the released code's update_model.sh, done right).

Writes an HF-layout model (safetensors, config, tokenizer, processor) that `LlavaForConditionalGeneration
.from_pretrained` loads, plus `mm_projector.bin` in the original key names. The projector is the tuned one (cast
to the base's dtype); every other tensor is the base's, bit for bit. The base may be in either layout; the
projector may be a `finetune --strategy projector` output or a bare `mm_projector.bin` / `projector.safetensors`.

`reuse_base` (an HF-layout base that is a stage output): only the safetensors file holding the projector is
rewritten (mysproj's own shards keep the projector alone in one); every other file is the base's, hard-linked
locally or copied inside the object store, and recorded with the hash the base's manifest gives it. The folder is
as complete as a fully written one; without `reuse_base` (or for other bases) the model is loaded and written
whole.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.models.conversion import PROJECTOR_HF_TO_ORIGINAL, current_name, projector_to_hf
from mysproj.models.integrity import check_weights_file
from mysproj.models.loading import INDEX, hf_model_output, load_llava
from mysproj.models.saving import replace_tensors, save_hf_model
from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.manifest import MANIFEST, StageInput, StageOutput, run_stage

log = logging.getLogger(__name__)
NOT_CARRIED = (MANIFEST, "mm_projector.bin", "metrics.jsonl")  # written anew, or the base stage's own record


def read_projector(uri: str) -> dict:
    """Projector tensors under HF names from a finetune output or a bare weights file."""

    uri = str(uri).rstrip("/")
    inp = StageInput.if_complete(uri, expect_stage="finetune")
    if inp is not None:
        if "projector.safetensors" not in inp.files:
            raise BadInput(f"{uri}: finetune output has no projector.safetensors (strategy "
                           f"{getattr(summary_of(inp.manifest), 'strategy', None)}); merge needs a projector fine-tune")
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


def _check_shape(cfg, name: str, tensor, base_shape) -> None:
    if tuple(tensor.shape) != tuple(base_shape):
        raise BadInput(f"{cfg.projector}: projector {name} has shape {tuple(tensor.shape)}, the base model's is "
                       f"{tuple(base_shape)}; was it trained on another base?")


def _save_mm_projector(projector: dict, dtypes: dict, folder: str) -> None:
    torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: v.to(dtypes[k]) for k, v in projector.items()},
               os.path.join(folder, "mm_projector.bin"))


def merge(cfg, out: StageOutput) -> dict:
    projector = read_projector(cfg.projector)
    base_output = reusable_base(cfg.base) if cfg.reuse_base else None
    if base_output is not None:
        return merge_reusing(cfg, out, projector, base_output)
    base = load_llava(cfg.base, dtype="auto")
    state = base.model.state_dict()
    for name, tensor in projector.items():
        _check_shape(cfg, name, tensor, state[name].shape)
        state[name] = tensor.to(state[name].dtype)
    with out.staging() as tmp:
        save_hf_model(state, base.model.config, base.tokenizer, base.image_processor, tmp, on_file=out.sender(tmp))
        _save_mm_projector(projector, {k: state[k].dtype for k in projector}, tmp)
        out.put_dir(tmp, move=True)
    return {"base": cfg.base, "projector": cfg.projector, "base_layout": base.layout,
            "random_weights": base.random_weights, "replaced": sorted(projector), "layout": "hf"}


def reusable_base(uri: str) -> StageInput | None:
    """The base as a stage output whose files merge can reuse (HF layout, safetensors weights), else None."""
    inp = hf_model_output(uri)
    if inp is None or inp.read_json("config.json").get("model_type") != "llava":
        return None
    return inp


def _projector_files(inp: StageInput, projector: dict, single: str | None) -> dict[str, dict[str, str]]:
    """{weights file: {name stored in it: projector name}} for the files that hold a projector tensor (`single`:
    the local copy of the base's model.safetensors where it has no index)."""

    if single is None:
        stored = inp.read_json(INDEX)["weight_map"]
    else:
        with safe_open(single, "pt") as f:
            stored = {k: "model.safetensors" for k in f.keys()}
    files: dict[str, dict[str, str]] = {}
    for name, fname in stored.items():
        current = current_name(name)
        if current in projector:
            files.setdefault(fname, {})[name] = current
    found = {p for names in files.values() for p in names.values()}
    if found != set(projector):
        raise BadInput(f"{inp.uri}: its weights hold no {', '.join(sorted(set(projector) - found))}; "
                       f"is it a LLaVA model?")
    return files


def merge_reusing(cfg, out: StageOutput, projector: dict, inp: StageInput) -> dict:
    """The `reuse_base` path (module docstring)."""

    # fetched and verified once: a base without an index is read for its names and then rewritten
    single = None if INDEX in inp.files else inp.local_path("model.safetensors")
    rewrite = _projector_files(inp, projector, single)
    dtypes = {}
    with out.staging() as tmp:
        for fname, names in rewrite.items():
            src = single or inp.local_path(fname)
            with safe_open(src, "pt") as f:
                for stored, name in names.items():
                    _check_shape(cfg, name, projector[name], f.get_slice(stored).get_shape())
            stored_dtypes = replace_tensors(src, os.path.join(tmp, fname), {s: projector[n] for s, n in names.items()})
            dtypes.update({names[s]: dtype for s, dtype in stored_dtypes.items()})
        _save_mm_projector(projector, dtypes, tmp)
        out.put_dir(tmp, move=True)
    carried = sorted(n for n in inp.files if "/" not in n and n not in NOT_CARRIED and n not in rewrite)
    # side by side: a server-side copy of a 5 GB shard takes the server seconds, and they are independent
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(carried)))) as pool:
        how = list(pool.map(lambda n: out.copy_file(inp.path(n), n, inp.files[n]), carried))
    log.info("merge: rewrote %s, reused %d files of %s (%s)", ", ".join(sorted(rewrite)), len(carried), inp.uri,
             ", ".join(f"{how.count(h)} by {h}" for h in sorted(set(how))))
    return {"base": cfg.base, "projector": cfg.projector, "base_layout": "hf",
            "random_weights": summary_of(inp.manifest).random_weights,
            "replaced": sorted(projector), "layout": "hf", "rewritten": sorted(rewrite),
            "reused": {"files": len(carried), "bytes": sum(int(inp.files[n]["size"]) for n in carried),
                       "by": sorted(set(how))}}


def run(cfg) -> dict:
    return run_stage("merge", cfg, lambda out: merge(cfg, out))
