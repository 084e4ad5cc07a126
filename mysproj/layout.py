"""Where each stage's output lives under a run root. The local runner, the Kubernetes controller and the report
all use this one convention:

    <root>/<dataset>/prep
    <root>/<dataset>/zero-shot/eval-clip              CLIP zero-shot
    <root>/<dataset>/zero-shot/eval-llava             LLaVA-1.5 zero-shot (greedy: no seed)
    <root>/<dataset>/zero-shot/seed<N>/probe          probes of the original model
    <root>/<dataset>/ft-<strategy>/seed<N>/finetune   strategy in projector, full, lora
    <root>/<dataset>/ft-projector/seed<N>/merge
    <root>/<dataset>/ft-<strategy>/seed<N>/eval-llava
    <root>/<dataset>/ft-<strategy>/seed<N>/probe
    <root>/models/<name>                             model-init outputs (random-weight presets)
    <root>/compile-cache                             torch.compile artifacts shared by stages, pods and re-runs
    <root>/report
"""

from __future__ import annotations

import functools
import re

from mysproj.config.registry import STAGES
from mysproj.storage import join

ZERO_SHOT = "zero-shot"


@functools.cache
def _pattern(stages: tuple[str, ...]) -> re.Pattern:
    names = "|".join(re.escape(s) for s in sorted(stages, key=len, reverse=True))
    return re.compile(rf"^(?P<dataset>[^/]+)/(?P<setting>zero-shot|ft-[a-z]+)(?:/seed(?P<seed>\d+))?"
                      rf"/(?P<stage>{names})$")


def setting_for(strategy: str | None) -> str:
    return ZERO_SHOT if strategy is None else f"ft-{strategy}"


def stage_uri(root: str, dataset: str, stage: str, setting: str | None = None, seed: int | None = None) -> str:
    parts = [dataset]
    if setting:
        parts.append(setting)
    if seed is not None:
        parts.append(f"seed{seed}")
    parts.append(stage)
    return join(root, *parts)


def parse(rel_path: str) -> dict | None:
    """{'dataset', 'setting', 'seed', 'stage'} for a path relative to a run root, or None (also where the last
    part names no registered stage)."""
    m = _pattern(tuple(STAGES)).match(rel_path.strip("/"))
    if not m:
        return None
    d = m.groupdict()
    d["seed"] = int(d["seed"]) if d["seed"] is not None else None
    return d
