"""`mysproj run --plan`: the schedule the local runner would follow and the wall time it predicts, from recorded
stage times (`mysproj.pipeline.stage_times`), by simulating the runner's own walk (`mysproj.pipeline.schedule`)
on a virtual clock. Nothing runs and nothing is written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mysproj.pipeline import dag, local, schedule, stage_times


@dataclass
class Plan:
    capacity: schedule.Capacity
    outcome: schedule.Outcome
    seconds: dict[str, float]          # stage output -> predicted seconds (0 where no record)
    unknown: list[str]                 # stage kinds without a record
    gpu_s: float                       # device-seconds the GPU stages hold


def durations(nodes: list[dag.Node], cap: schedule.Capacity, times: stage_times.StageTimes,
              datasets: list[str]) -> dict[str, float | None]:
    """Predicted seconds per stage output (None without a record of its kind)."""
    sizes = stage_times.dataset_sizes(times, datasets)
    return {n.name: stage_times.predict(n, times, sizes, cap.demand(n)[0]) for n in nodes}


def stage_cost(cfg: dag.PipelineConfig, cap: schedule.Capacity,
               times: stage_times.StageTimes) -> Callable[[dag.Node], float]:
    """The walk's priority cost: each stage's predicted seconds (0 without a record)."""
    seconds = durations(dag.build(cfg), cap, times, cfg.datasets)
    return lambda n: seconds.get(n.name) or 0.0


def predict(cfg: dag.PipelineConfig, cap: schedule.Capacity, times: stage_times.StageTimes,
            only: list[str] | None = None) -> Plan:
    nodes = local.select(dag.build(cfg), only)
    predicted = durations(nodes, cap, times, cfg.datasets)
    seconds = {k: v or 0.0 for k, v in predicted.items()}
    unknown = sorted({stage_times.kind(n.stage, n.config) for n in nodes if predicted[n.name] is None})
    outcome = schedule.walk(nodes, cap, schedule.Simulated(lambda n: seconds[n.name]),
                            cost=lambda n: seconds[n.name], memory=lambda n: stage_times.memory(n, times))
    gpu_s = sum(seconds[n.name] * cap.demand(n)[0] for n in nodes if n.gpu)
    return Plan(cap, outcome, seconds, unknown, gpu_s)


def render(plan: Plan, sources: list[str]) -> str:
    cap = plan.capacity
    cpu = f" + {cap.cpu} CPU slots" if cap.cpu else " (CPU stages take it too)"
    if cap.share > 1:
        cpu += (f", up to {cap.share} stages a device where their recorded memory fits {cap.device_gib:.0f} GiB "
                "(each timed as if alone)")
    lines = [f"plan: {len(plan.outcome.events)} stages on {cap.devices} device slot(s){cpu}, fine-tuning on "
             f"{cap.finetune_devices} device(s); stage times from {', '.join(sources) or 'nothing recorded'}",
             f"{'start s':>9} {'end s':>9}  {'slot':<8} stage output (stage)"]
    for e in sorted(plan.outcome.events, key=lambda e: (e.start or 0.0, e.end or 0.0)):
        lines.append(f"{e.start or 0.0:9.1f} {e.end or 0.0:9.1f}  {e.slot:<8} {e.name} ({e.stage})")
    wall = plan.outcome.wall_s
    busy = plan.gpu_s / (wall * cap.devices) if wall else 0.0
    lines.append(f"predicted wall time: {wall:.0f} s ({wall / 60:.1f} min); GPU stages hold {plan.gpu_s:.0f} "
                 f"device-seconds, {100 * busy:.0f}% of the {cap.devices} slot(s)")
    if plan.unknown:
        lines.append(f"no recorded time (counted as 0 s): {', '.join(plan.unknown)}")
    return "\n".join(lines)
