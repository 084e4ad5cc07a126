"""`mysproj` command line: a thin face over the stage registry and the pipeline.

Every stage command is generated from its config dataclass: `mysproj <stage> --config FILE --field-name VALUE`.
Bad input of any kind prints one `error:` line and exits with EXIT_BAD_INPUT (never retried by Kubernetes).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mysproj import process
from mysproj.bench import command as bench_command
from mysproj.commands import ask, reproduce, show_example
from mysproj.commands import status as status_command
from mysproj.config.fields import add_arguments
from mysproj.errors import EXIT_BAD_INPUT, redact
from mysproj.pipeline import command as pipeline_command
from mysproj.process import setup_logging
from mysproj.stages import registry
from mysproj.stages.registry import STAGES, stage_config

# Commands beyond the per-stage ones (mysproj.commands: they write no stage output), each in its own module with
# `add_command(subparsers, parser_class)`.
COMMAND_MODULES = (
    pipeline_command,   # mysproj run
    status_command,     # mysproj status / logs
    reproduce,          # mysproj reproduce
    bench_command,      # mysproj bench
    ask,                # mysproj ask
    show_example,       # mysproj show-example
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2; a usage error is bad input like any other
        self.print_usage(sys.stderr)
        print(f"error: {redact(message)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        values = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func", "force", "sub")}
        cfg = stage_config(stage, yaml_file=ns.config, cli=values, env=os.environ)
        manifest = registry.run(stage, cfg, force=ns.force)
        state = "skipped (already complete)" if manifest.get("skipped") else "done"
        print(f"{stage}: {state} -> {cfg.out}")
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mysproj", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for stage, record in STAGES.items():
        if stage == "model-init":
            continue
        cls = record.config
        p = sub.add_parser(stage, help=(cls.__doc__ or stage).splitlines()[0])
        p.add_argument("--config", default=None, help="YAML file with field: value pairs")
        p.add_argument("--force", action="store_true", help="run even if --out holds a complete output (of this "
                       "or another stage), replacing it")
        add_arguments(p, cls)
        p.set_defaults(func=_stage_command(stage))
    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    init = msub.add_parser("init", help="write a random-weight model of a preset architecture")
    init.add_argument("--config", default=None)
    init.add_argument("--force", action="store_true", help="run even if --out holds a complete output")
    add_arguments(init, STAGES["model-init"].config)
    init.set_defaults(func=_stage_command("model-init"))
    for module in COMMAND_MODULES:
        module.add_command(sub, _Parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ns = build_parser().parse_args(argv)
    return process.run(ns.command, lambda: ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
