"""A stage's config for the `ours` side of a benchmark: the stage's defaults, the benchmark's fixed values, then
the user's `--set FIELD=VALUE` flags, validated like any stage config."""

from __future__ import annotations


def stage_config(cls, args, **values):
    from mysproj.config.fields import load_config

    return load_config(cls, env={}, overrides={**values, **dict(args.set or [])})
