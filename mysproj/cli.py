"""`mysproj` command line: a thin face over the stage registry and the pipeline.

Every stage command is generated from its config dataclass: `mysproj <stage> --config FILE --field-name VALUE`.
Bad input of any kind prints one `error:` line and exits with EXIT_BAD_INPUT (never retried by Kubernetes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from mysproj.bench import command as bench_command
from mysproj.config.fields import add_arguments, load_config
from mysproj.errors import EXIT_BAD_INPUT, BadInput
from mysproj.kube import command as kube_command
from mysproj.kube import reproduce
from mysproj.kube.entry import deployment_problem, prepare_scratch
from mysproj.pipeline import command as pipeline_command
from mysproj.stages import ask
from mysproj.stages.registry import STAGES

# Commands beyond the per-stage ones, each in its own module with `add_command(subparsers, parser_class)`.
COMMAND_MODULES = (
    pipeline_command,   # mysproj run
    kube_command,       # mysproj status / logs
    reproduce,          # mysproj reproduce
    bench_command,      # mysproj bench
    ask,                # mysproj ask
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2; a usage error is bad input like any other
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def setup_logging() -> None:
    level = os.environ.get("MYSPROJ_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_config(stage: str, ns: argparse.Namespace):
    cls = STAGES[stage][0]
    values = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func", "force", "sub")}
    return load_config(cls, yaml_file=ns.config, cli=values)


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        from mysproj.stages import registry

        cfg = stage_config(stage, ns)
        manifest = registry.run(stage, cfg)
        state = "skipped (already complete)" if manifest.get("skipped") else "done"
        print(f"{stage}: {state} -> {cfg.out}")
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mysproj", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for stage, (cls, _) in STAGES.items():
        if stage == "model-init":
            continue
        p = sub.add_parser(stage, help=(cls.__doc__ or stage).splitlines()[0])
        p.add_argument("--config", default=None, help="YAML file with field: value pairs")
        add_arguments(p, cls)
        p.set_defaults(func=_stage_command(stage))
    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    init = msub.add_parser("init", help="write a random-weight model of a preset architecture")
    init.add_argument("--config", default=None)
    add_arguments(init, STAGES["model-init"][0])
    init.set_defaults(func=_stage_command("model-init"))
    for module in COMMAND_MODULES:
        module.add_command(sub, _Parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        prepare_scratch()
        return int(ns.func(ns) or 0)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ModuleNotFoundError, OSError) as e:  # in a container: a module the image lacks, a read-only root
        problem = deployment_problem(ns.command, e)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
