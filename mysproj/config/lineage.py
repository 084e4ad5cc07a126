"""The one reader of what a stage output descends from, read from the manifests: the model chain behind a model
(a merge's base, a fine-tune's model, ... down to the model-init or fetch output it started from) and the config
of the fine-tune behind a model (the model itself for full/lora, or the projector a merge put in). Which config
field leads to the parent is each stage's registry entry (`model_from`, `tuned_from`). The report's provenance
and Protocol section and eval-llava's `stop=auto` read it. No ML imports."""

from __future__ import annotations

from mysproj.config.registry import STAGES, summary_of
from mysproj.storage.manifest import read_manifest

MAX_DEPTH = 6  # a chain longer than this is not one the pipeline writes (and a loop must end)


def stage_config(uri: str | None, cache: dict) -> dict | None:
    """{"stage", "config", "manifest"} of the stage output at `uri`, or None (not a stage output). Each manifest
    is read once per `cache`."""
    if not uri:
        return None
    if uri not in cache:
        m = read_manifest(uri)
        cache[uri] = None if m is None else {"stage": m.get("stage"), "config": m.get("config") or {},
                                             "manifest": m}
    return cache[uri]


def _parent(node: dict) -> str | None:
    record = STAGES.get(node["stage"] or "")
    return node["config"].get(record.model_from) if record and record.model_from else None


def model_chain(model_uri: str | None, cache: dict | None = None) -> list[tuple[str, dict]]:
    """(URI, `stage_config` entry) of the model and each model it derives from, the model first; it ends at an
    output that derives from none (model-init, fetch) or before a URI that is not a stage output."""
    cache = {} if cache is None else cache
    chain: list[tuple[str, dict]] = []
    uri = model_uri
    while uri and len(chain) < MAX_DEPTH:
        node = stage_config(uri, cache)
        if node is None:
            break
        chain.append((uri, node))
        uri = _parent(node)
    return chain


def provenance(model_uri: str | None, cache: dict | None = None) -> dict:
    """{"model", "random_weights", "chain" (stage names), "base" (the first model's URI, where the model derives
    from one), "preset"}: `random_weights` from the summary of the output the chain starts from, None when that is
    not a stage output (weights brought by the user)."""
    info: dict = {"model": model_uri, "random_weights": None, "chain": []}
    chain = model_chain(model_uri, cache)
    if not chain:
        return info
    info["chain"] = [node["stage"] for _, node in chain]
    origin_uri, origin = chain[-1]
    brought = _parent(origin)  # the chain ends at a model the user brought (not a stage output)
    record = STAGES.get(origin["stage"] or "")
    if brought is None and record is not None and record.model:
        info["random_weights"] = bool(summary_of(origin["manifest"]).random_weights)
        if "preset" in origin["config"]:
            info["preset"] = origin["config"]["preset"]
    if brought or len(chain) > 1:
        info["base"] = brought or origin_uri
    return info


def finetune_config(model_uri: str | None, cache: dict) -> dict | None:
    """The finetune config behind a model: the model itself (full/lora) or the projector a merge put in."""
    out = stage_config(model_uri, cache)
    record = STAGES.get(out["stage"] or "") if out else None
    if out and record is not None and record.tuned_from:
        out = stage_config(out["config"].get(record.tuned_from), cache)
    return out["config"] if out and out["stage"] == "finetune" else None
