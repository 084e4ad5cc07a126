"""Find finished eval and probe outputs under run roots and read what the report needs from each.

A run root is walked for `_SUCCESS.json` files; each folder's path relative to the root is mapped with
`mysproj.layout.parse` to (dataset, setting, seed, stage). A URI given directly to a stage output is mapped
from the tail of its own path. The dataset itself is read from the manifests, not the path: the prep output the
stage read names it, and runs of one dataset name whose prep outputs hold different content (two roots prepared
from different sources) are reported apart, never averaged as seeds. No ML imports: the report runs in the slim
image too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mysproj import layout
from mysproj.config import lineage
from mysproj.config.registry import STAGES
from mysproj.errors import BadInput
from mysproj.storage import join, list_files
from mysproj.storage.digest import manifest_digest
from mysproj.storage.manifest import MANIFEST, StageInput, read_manifest

log = logging.getLogger(__name__)


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


def _prep_of(data_uri: str | None, cache: dict) -> tuple[str | None, str | None]:
    """(dataset, content digest) of the prep output at `data_uri`; Nones where it is not there any more."""
    node = lineage.stage_config(data_uri, cache)
    return (node["config"].get("dataset"), manifest_digest(node["manifest"])) if node else (None, None)


def _split_by_content(runs: list[Run]) -> None:
    """Runs of one dataset name that read prep outputs of different content are different datasets: each gets
    its prep digest's first 8 characters after the name."""
    digests: dict[str, set[str]] = {}
    for r in runs:
        if r.provenance.get("prep_digest"):
            digests.setdefault(r.dataset, set()).add(r.provenance["prep_digest"])
    for name, found in digests.items():
        if len(found) > 1:
            log.warning("report: runs named '%s' read %d prep outputs of different content; reported apart as "
                        "%s", name, len(found), ", ".join(f"{name}@{d[:8]}" for d in sorted(found)))
            for r in runs:
                if r.dataset == name and r.provenance.get("prep_digest"):
                    r.dataset = f"{name}@{r.provenance['prep_digest'][:8]}"


def gather(roots: list[str]) -> list[Run]:
    runs: list[Run] = []
    cache: dict = {}  # manifests read once, however many runs descend from them
    for root in roots:
        located = _locate(root)
        if not located:
            log.warning("report: no finished stage outputs under %s", root)
        for uri, where in located:
            if not STAGES[where["stage"]].reported:
                continue
            out = StageInput.if_complete(uri, expect_stage=where["stage"])
            if out is None:  # its manifest is damaged: an incomplete output (`read_manifest` said so)
                continue
            cfg = out.manifest.get("config") or {}
            prov = lineage.provenance(cfg.get("model"), cache)
            prov["data"] = cfg.get("data")
            prov["prep_dataset"], prov["prep_digest"] = _prep_of(cfg.get("data"), cache)
            dataset = prov["prep_dataset"] or where["dataset"]
            if dataset != where["dataset"]:
                log.warning("report: %s lies under '%s' but read a '%s' prep output (%s); reported as %s", uri,
                            where["dataset"], dataset, cfg.get("data"), dataset)
            runs.append(Run(dataset=dataset, setting=where["setting"], seed=where["seed"],
                            stage=where["stage"], uri=uri, manifest=out.manifest,
                            metrics=out.read_json("metrics.json"), provenance=prov))
    _split_by_content(runs)
    runs.sort(key=lambda r: (r.dataset, r.setting, r.stage, -1 if r.seed is None else r.seed, r.uri))
    return runs


def run_name(r: Run) -> str:
    return f"{r.dataset}/{r.setting}{'' if r.seed is None else f'/seed{r.seed}'}/{r.stage}"
