"""Configs and runs of the stages the registry (`mysproj.config.registry`) lists, and the one lazy boundary to the
torch side: everything above it (the CLI, the job entry points, the controller, the pipeline) reaches torch code only
through `load`, by name, so it parses configs and plans runs without importing torch (the contracts in pyproject.toml
check it). Below the boundary, imports sit at module top."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mysproj.config.fields import load_config
from mysproj.config.registry import STAGES
from mysproj.storage.manifest import forcing

__all__ = ["STAGES", "implementation", "load", "node_configs", "run", "stage_config", "visible_gpus"]


def stage_config(stage: str, overrides: dict[str, Any] | None = None, *, yaml_file: str | None = None,
                 cli: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Any:
    """The validated config of `stage`: defaults < YAML file < `env` (`MYSPROJ_<FIELD>`) < overrides < CLI values.
    `env` defaults to none at all: a DAG node's or a benchmark's config is exactly what it is given, whatever the
    process environment holds; the command line passes `os.environ`."""
    return load_config(STAGES[stage].config, yaml_file=yaml_file, cli=cli, env=env,
                       overrides=overrides)


def node_configs(nodes: Iterable[Any]) -> dict[str, Any]:
    """Node name -> validated config of each DAG node (`mysproj.pipeline.dag.Node`: its `stage` and `config`)."""
    return {n.name: stage_config(n.stage, n.config) for n in nodes}


def load(target: str) -> Callable:
    """The function `module:name` names, its module imported now (the lazy boundary)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def implementation(stage: str) -> Callable[[Any], dict]:
    return load(f"{STAGES[stage].module}:run")


def visible_gpus() -> int:
    return load("mysproj.speed.device:visible_gpus")()


def run(stage: str, cfg: Any, *, force: bool = False) -> dict:
    """Run one stage in-process; returns its manifest. `force` runs it even where its output is complete, also
    over another stage's complete output. Inputs named by a remote origin are fetched first (`stages.fetch`)."""
    # Outside `forcing`: --force re-runs this stage, not the downloads of its inputs.
    cfg = load("mysproj.stages.fetch:stage_remote_inputs")(cfg)
    with forcing(force):
        return implementation(stage)(cfg)
