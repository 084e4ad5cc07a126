"""`mysproj run --config FILE`: the whole experiment locally."""

from __future__ import annotations

from mysproj.config.fields import add_arguments, load_config
from mysproj.pipeline.dag import PipelineConfig
from mysproj.storage import join


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("run", help="run the whole pipeline (prep ... report) in this process")
    p.add_argument("--config", default=None, help="YAML file of PipelineConfig fields")
    p.add_argument("--only", default=None, help="comma-separated node-name prefixes to run")
    add_arguments(p, PipelineConfig)
    p.set_defaults(func=_run)


def _run(ns) -> int:
    from mysproj.pipeline import local

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func", "only")}
    cfg = load_config(PipelineConfig, yaml_file=ns.config, cli=values)
    results = local.run(cfg, only=ns.only.split(",") if ns.only else None)
    skipped = sum(1 for m in results.values() if m.get("skipped"))
    print(f"pipeline: {len(results)} stages ({skipped} skipped as already complete)")
    report = results.get("report")
    if report:
        print(f"report: {join(cfg.root, 'report', 'report.md')}")
        table = (report.get("summary") or {}).get("table1_rows")
        if table:
            print(table)
    return 0
