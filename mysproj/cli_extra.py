"""Commands beyond the generated per-stage ones. Each module named here exposes
`add_command(subparsers, parser_class)`; keeping the list here lets each face live in its own file."""

from __future__ import annotations

import importlib

COMMAND_MODULES = (
    "mysproj.pipeline.command",   # mysproj run
    "mysproj.kube.command",       # mysproj status / logs
    "mysproj.kube.reproduce",     # mysproj reproduce
    "mysproj.bench.command",      # mysproj bench
    "mysproj.stages.ask",         # mysproj ask
    "mysproj.stages.show_example",  # mysproj show-example
)


def register(sub, parser_class) -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_command(sub, parser_class)
