"""Run the pipeline DAG in this process, stage after stage: the embedded default (no cluster needed).
A stage whose manifest already matches its config is skipped, so a re-run resumes where it stopped."""

from __future__ import annotations

import logging
import time

from mysproj.pipeline import dag
from mysproj.stages import registry

log = logging.getLogger(__name__)


def run(cfg: dag.PipelineConfig, only: list[str] | None = None) -> dict[str, dict]:
    nodes = dag.build(cfg)
    # Validate every stage's config before running any, so a typo fails in seconds, not after training.
    configs = {n.name: registry.stage_config(n.stage, n.config) for n in nodes}
    results: dict[str, dict] = {}
    for i, node in enumerate(nodes, 1):
        if only and not any(node.name.startswith(o) for o in only):
            continue
        t0 = time.monotonic()
        log.info("[%d/%d] %s (%s)", i, len(nodes), node.name, node.stage)
        manifest = registry.run(node.stage, configs[node.name])
        state = "skipped" if manifest.get("skipped") else f"done in {time.monotonic() - t0:.1f}s"
        log.info("[%d/%d] %s: %s", i, len(nodes), node.name, state)
        results[node.name] = manifest
    return results
