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
import traceback
from collections.abc import Callable

from mysproj.bench import command as bench_command
from mysproj.commands import ask, reproduce, show_example
from mysproj.commands import status as status_command
from mysproj.config.fields import add_arguments
from mysproj.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadInput, Preempted, StorageError, no_space, redact
from mysproj.kube.entry import deployment_problem, prepare_scratch
from mysproj.pipeline import command as pipeline_command
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


class _RedactingFormatter(logging.Formatter):
    def format(self, record):
        return redact(super().format(record))


def _print_redacted_traceback(kind, value, tb) -> None:
    print(redact("".join(traceback.format_exception(kind, value, tb))), file=sys.stderr, end="", flush=True)


def setup_logging() -> None:
    """Log lines, and the traceback of an exception nobody caught, printed with secrets redacted: whatever a
    library put into a message (botocore echoes URIs and bucket names) never shows a credential."""
    sys.excepthook = _print_redacted_traceback
    raw = os.environ.get("MYSPROJ_LOG_LEVEL", "INFO")
    level = raw.strip().upper() or "INFO"
    known = level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    logging.basicConfig(level=level if known else "INFO", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not known:  # a junk value must not stop every command, --help included
        logging.getLogger("mysproj").warning("MYSPROJ_LOG_LEVEL=%r is not a log level (DEBUG, INFO, WARNING, ERROR, "
                                             "CRITICAL); using INFO", raw)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stage_command(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        from mysproj.stages import registry

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
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        prepare_scratch()
        return int(ns.func(ns) or 0)
    except BadInput as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except StorageError as e:  # a retry may help (the endpoint back, space freed): not exit 64
        print(f"error: {redact(e)}", file=sys.stderr)
        return 1
    except (ModuleNotFoundError, OSError) as e:  # in a container: a module the image lacks, a read-only root
        if no_space(e):  # written outside the storage layer (a library saving a file): still one line
            print(f"error: {redact(no_space(e))}", file=sys.stderr)
            return 1
        problem = deployment_problem(ns.command, e)
        if problem is None:
            raise
        print(f"error: {redact(problem)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
