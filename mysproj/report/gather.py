"""Find finished eval and probe outputs under run roots and read what the report needs from each.

A run root is walked for `_SUCCESS.json` files; each folder's path relative to the root is mapped with
`mysproj.layout.parse` to (dataset, setting, seed, stage). A URI given directly to a stage output is mapped
from the tail of its own path. No ML imports: the report runs in the slim image too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mysproj import layout
from mysproj.errors import BadInput
from mysproj.storage import join, list_files
from mysproj.storage.manifest import MANIFEST, StageInput, read_manifest

log = logging.getLogger(__name__)
REPORTED_STAGES = ("eval-clip", "eval-llava", "probe")


@dataclass
class Run:
    dataset: str
    setting: str
    seed: int | None
    stage: str
    uri: str
    manifest: dict
    metrics: dict
    provenance: dict = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return self.manifest.get("config_hash", "")


def _locate(uri: str) -> list[tuple[str, dict]]:
    """(stage output URI, parsed layout) for every finished stage output at or below `uri`."""
    uri = uri.rstrip("/")
    if read_manifest(uri) is not None:
        parts = uri.split("/")
        for n in (4, 3):
            parsed = layout.parse("/".join(parts[-n:])) if len(parts) >= n else None
            if parsed:
                return [(uri, parsed)]
        raise BadInput(f"{uri}: a stage output outside the run layout (<dataset>/<setting>[/seed<N>]/<stage>); "
                       f"pass its run root instead")
    found = []
    for rel in list_files(uri):
        if not rel.endswith("/" + MANIFEST):
            continue
        folder = rel[: -len(MANIFEST) - 1]
        parsed = layout.parse(folder)
        if parsed:
            found.append((join(uri, folder), parsed))
    return found


def model_provenance(model_uri: str | None, _depth: int = 0) -> dict:
    """Follow a model URI back through merge/finetune outputs to its base; `random_weights` comes from the
    model-init manifest's summary, None when the base is not a stage output (weights brought by the user)."""
    info = {"model": model_uri, "random_weights": None, "chain": []}
    if not model_uri or _depth > 5:
        return info
    m = read_manifest(model_uri)
    if m is None:
        return info
    stage = m.get("stage")
    cfg = m.get("config") or {}
    info["chain"] = [stage]
    if stage == "model-init":
        info["random_weights"] = bool((m.get("summary") or {}).get("random_weights", True))
        info["preset"] = cfg.get("preset")
        return info
    if stage == "fetch":  # weights downloaded and staged: real ones unless its summary says otherwise
        info["random_weights"] = bool((m.get("summary") or {}).get("random_weights", False))
        return info
    parent = cfg.get("base") if stage == "merge" else cfg.get("model")
    up = model_provenance(parent, _depth + 1)
    info["random_weights"] = up["random_weights"]
    info["chain"] += up["chain"]
    info["base"] = up["model"] if not up.get("base") else up["base"]
    if up.get("preset"):
        info["preset"] = up["preset"]
    return info


def _dataset_of(data_uri: str | None) -> str | None:
    m = read_manifest(data_uri) if data_uri else None
    return (m or {}).get("config", {}).get("dataset")


def gather(roots: list[str]) -> list[Run]:
    runs: list[Run] = []
    for root in roots:
        located = _locate(root)
        if not located:
            log.warning("report: no finished stage outputs under %s", root)
        for uri, where in located:
            if where["stage"] not in REPORTED_STAGES:
                continue
            out = StageInput(uri, expect_stage=where["stage"])
            cfg = out.manifest.get("config") or {}
            prov = model_provenance(cfg.get("model"))
            prov["data"] = cfg.get("data")
            prov["prep_dataset"] = _dataset_of(cfg.get("data"))
            runs.append(Run(dataset=where["dataset"], setting=where["setting"], seed=where["seed"],
                            stage=where["stage"], uri=uri, manifest=out.manifest,
                            metrics=out.read_json("metrics.json"), provenance=prov))
    runs.sort(key=lambda r: (r.dataset, r.setting, r.stage, -1 if r.seed is None else r.seed, r.uri))
    return runs
