"""`mysproj run --config FILE`: the whole experiment locally; `--plan` prints the schedule it would follow."""

from __future__ import annotations

import dataclasses
import logging
import os

from mysproj.config.fields import add_arguments, env_name, load_config, read_values
from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.pipeline import local, plan, stage_times
from mysproj.pipeline.dag import PipelineConfig
from mysproj.stages.registry import STAGES
from mysproj.storage import join

RUN_OPTIONS = ("command", "config", "values", "func", "only", "gpus", "finetune_gpus", "share_gpu", "device_gib",
               "log_dir", "plan", "stage_times")


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("run", help="run the whole pipeline (prep ... report) on this machine")
    p.add_argument("--config", default=None, help="YAML file of PipelineConfig fields")
    p.add_argument("--values", default=None, help="a Helm values file of the chart: its `pipeline` section is the "
                                                  "config (e.g. charts/mysproj/values-paper.yaml)")
    p.add_argument("--only", default=None, help="comma-separated node-name prefixes to run")
    p.add_argument("--gpus", type=int, default=None,
                   help="device slots: independent GPU stages run side by side, one per slot, each in its own "
                        "process (default: every visible GPU; 1 = every stage in turn in this process)")
    p.add_argument("--finetune-gpus", type=int, default=1, help="device slots one fine-tuning run takes (torchrun)")
    add_share_arguments(p)
    p.add_argument("--log-dir", default=None, help="each stage's log with --gpus > 1 (default: <root>/logs)")
    p.add_argument("--plan", action="store_true",
                   help="print the schedule and predicted wall time instead of running (needs stage times)")
    p.add_argument("--stage-times", action="append", default=None, metavar="SOURCE",
                   help="recorded stage times: a run root (its manifests) or a JSON file of `mysproj bench "
                        "pipeline`; repeatable. --plan reads the run's own root when none is given; a run given "
                        "them starts the stages with the most predicted work behind them first, as the plan does")
    add_arguments(p, PipelineConfig)
    p.set_defaults(func=_run)


log = logging.getLogger(__name__)


def add_share_arguments(p) -> None:
    p.add_argument("--share-gpu", type=int, default=1, metavar="N",
                   help="up to N one-device stages side by side on a device, where their recorded peak memory "
                        "(--stage-times of the same card) fits; each in its own process (default 1: no sharing)")
    p.add_argument("--device-gib", type=float, default=None,
                   help="each device's memory for --share-gpu (default: the smallest GPU's, from nvidia-smi)")


def share_options(ns, gpus: int, finetune_gpus: int, times: stage_times.StageTimes | None):
    """(capacity, memory(node)) of the run's --gpus/--share-gpu/--device-gib and its stage times."""
    gib = ns.device_gib if ns.device_gib is not None else (local.device_gib() if ns.share_gpu > 1 else 0.0)
    cap = local.capacity(gpus, finetune_gpus, ns.share_gpu, gib)
    if cap.share > 1 and times is None:
        raise BadInput(f"--share-gpu {cap.share} needs --stage-times: the recorded peak memory of each stage kind "
                       "(a run root or `mysproj bench pipeline` JSON of the same card)")
    return cap, (lambda n: stage_times.memory(n, times)) if times is not None else None


def warn_stage_env(env) -> list[str]:
    """One warning per `MYSPROJ_<field>` variable of a stage field that `mysproj run` does not apply (it applies
    only the pipeline's own fields; a stage field is set for the run under `overrides`). Returns the names."""

    own = {env_name(f.name) for f in dataclasses.fields(PipelineConfig)}
    stages: dict[str, list[str]] = {}
    for stage, record in STAGES.items():
        for f in dataclasses.fields(record.config):
            if env_name(f.name) in env and env_name(f.name) not in own:
                stages.setdefault(f.name, []).append(stage)
    for name, where in sorted(stages.items()):
        log.warning("%s is set but `mysproj run` does not apply stage variables (ignored); set it for the run as "
                    "overrides: {%s: {%s: ...}}", env_name(name), where[0], name)
    return [env_name(n) for n in sorted(stages)]


def _values_pipeline(path: str | None) -> dict:
    if not path:
        return {}
    section = read_values(path).get("pipeline")
    if not isinstance(section, dict):
        raise BadInput(f"values file {path}: no `pipeline:` mapping; pass a values file of charts/mysproj")
    return section


def _run(ns) -> int:
    values = {k: v for k, v in vars(ns).items() if k not in RUN_OPTIONS}
    cfg = load_config(PipelineConfig, yaml_file=ns.config, overrides=_values_pipeline(ns.values), cli=values,
                      env=os.environ)
    warn_stage_env(os.environ)
    only = ns.only.split(",") if ns.only else None
    gpus = ns.gpus if ns.gpus is not None else max(1, local.visible_gpus())
    sources = ns.stage_times or ([] if not ns.plan else [cfg.root])
    times = stage_times.load(sources) if sources else None
    cap, memory = share_options(ns, gpus, ns.finetune_gpus, times)
    if ns.plan:
        print(plan.render(plan.predict(cfg, cap, times, only), sources))
        return 0
    cost = plan.stage_cost(cfg, cap, times) if times is not None else None
    outcome = local.run(cfg, only, gpus=gpus, finetune_gpus=ns.finetune_gpus, share=cap.share,
                        device_gib=cap.device_gib, log_dir=ns.log_dir, cost=cost, memory=memory)
    counts = {s: len(outcome.of(s)) for s in ("done", "skipped", "failed", "blocked")}
    print(f"pipeline: {len(outcome.events)} stages in {outcome.wall_s:.0f} s on {gpus} device slot(s): "
          + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for e in outcome.of("failed"):
        print(f"failed: {e.name}: {e.error}")
    report = outcome.manifests.get("report")
    if report:
        print(f"report: {join(cfg.root, 'report', 'report.md')}")
        table = summary_of(report).table1_rows
        if table:
            print(table)
    return local.exit_code(outcome)
