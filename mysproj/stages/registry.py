"""Configs and runs of the stages the registry (`mysproj.config.registry`) lists. Implementations are imported
lazily so that the CLI, the job entrypoints and the controller can parse configs without importing torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mysproj.config.fields import load_config
from mysproj.config.registry import STAGES

__all__ = ["STAGES", "implementation", "node_configs", "run", "stage_config"]


def stage_config(stage: str, overrides: dict[str, Any] | None = None, *, yaml_file: str | None = None,
                 cli: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Any:
    """The validated config of `stage`: defaults < YAML file < `env` (`MYSPROJ_<FIELD>`) < overrides < CLI values.
    `env` defaults to none at all: a DAG node's or a benchmark's config is exactly what it is given, whatever the
    process environment holds; the command line passes `os.environ`."""
    return load_config(STAGES[stage].config, yaml_file=yaml_file, cli=cli, env={} if env is None else env,
                       overrides=overrides)


def node_configs(nodes: Iterable[Any]) -> dict[str, Any]:
    """Node name -> validated config of each DAG node (`mysproj.pipeline.dag.Node`: its `stage` and `config`)."""
    return {n.name: stage_config(n.stage, n.config) for n in nodes}


def implementation(stage: str) -> Callable[[Any], dict]:
    return importlib.import_module(STAGES[stage].module).run


def run(stage: str, cfg: Any, *, force: bool = False) -> dict:
    """Run one stage in-process; returns its manifest. `force` runs it even where its output is complete, also
    over another stage's complete output. Inputs named by a remote origin are fetched first (`stages.fetch`)."""
    from mysproj.stages.fetch import stage_remote_inputs
    from mysproj.storage.manifest import forcing

    cfg = stage_remote_inputs(cfg)  # outside `forcing`: --force re-runs this stage, not the downloads of its inputs
    with forcing(force):
        return implementation(stage)(cfg)
