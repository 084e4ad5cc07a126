"""What a stage output descends from, read from the manifests: the config of the fine-tune behind a model (the
model itself for full/lora, or the projector a merge put in). The report's Protocol section and eval-llava's
`stop=auto` read it."""

from __future__ import annotations

from mysproj.storage.manifest import read_manifest


def stage_config(uri: str | None, cache: dict) -> dict | None:
    """{"stage", "config"} of the stage output at `uri`, or None (not a stage output)."""
    if not uri:
        return None
    if uri not in cache:
        m = read_manifest(uri)
        cache[uri] = None if m is None else {"stage": m.get("stage"), "config": m.get("config") or {}}
    return cache[uri]


def finetune_config(model_uri: str | None, cache: dict) -> dict | None:
    """The finetune config behind a model: the model itself (full/lora) or the projector a merge put in."""
    out = stage_config(model_uri, cache)
    if out and out["stage"] == "merge":
        out = stage_config(out["config"].get("projector"), cache)
    return out["config"] if out and out["stage"] == "finetune" else None
