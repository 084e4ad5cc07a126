"""The runner's scheduling rule on simulated device slots: dependency order, the concurrency cap, failure
isolation, resume, multi-device fine-tuning and the priority of long chains."""

import pytest

from mysproj.config.fields import load_config
from mysproj.pipeline import dag, local, schedule

DURATION = {"model-init": 5.0, "prep": 2.0, "finetune": 30.0, "merge": 3.0, "eval-clip": 4.0, "eval-llava": 8.0,
            "probe": 6.0, "report": 1.0}


def _nodes(**kw):
    base = {"root": "/r", "seeds": [0, 1, 2]}
    return dag.build(load_config(dag.PipelineConfig, overrides={**base, **kw}, env={}))


def _walk(nodes, cap, fail=(), complete=lambda n: None, cost=None):
    executor = schedule.Simulated(lambda n: DURATION[n.stage], set(fail))
    return schedule.walk(nodes, cap, executor, complete=complete, cost=cost), executor


def _running_at(outcome, t):
    return [e for e in outcome.events if e.state == "done" and e.start <= t < e.end]


def test_every_stage_starts_after_its_dependencies_end():
    nodes = _nodes()
    outcome, _ = _walk(nodes, schedule.Capacity(4, 2))
    ends = {e.name: e.end for e in outcome.events}
    starts = {e.name: e.start for e in outcome.events}
    assert len(outcome.events) == len(nodes) and outcome.ok
    for n in nodes:
        for d in n.deps:
            assert starts[n.name] >= ends[d], (n.name, d)


@pytest.mark.parametrize("devices,cpu", [(1, 0), (2, 2), (3, 1), (8, 8)])
def test_concurrency_never_exceeds_the_slots(devices, cpu):
    nodes = _nodes(strategies=["projector", "full", "lora"])
    cap = schedule.Capacity(devices, cpu)
    outcome, executor = _walk(nodes, cap)
    assert outcome.ok
    gpu = {n.name for n in nodes if n.gpu}
    for t in sorted({e.start for e in outcome.events}):
        now = _running_at(outcome, t)
        on_devices = [e for e in now if e.name in gpu or not cpu]
        assert len(on_devices) <= devices
        assert len(now) - len(on_devices) <= cpu
        slots = [e.slot for e in on_devices]
        assert len(slots) == len(set(slots)), f"two stages on one device slot at {t}: {slots}"
    assert executor.peak <= devices + cpu
    if devices > 1:  # the slots are used: more than one stage ran at once
        assert executor.peak > 1


def test_one_slot_runs_every_stage_in_turn():
    outcome, executor = _walk(_nodes(), schedule.Capacity(1, 0))
    assert executor.peak == 1
    spans = sorted((e.start, e.end) for e in outcome.events)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert outcome.wall_s == pytest.approx(sum(e.seconds for e in outcome.events))


def test_a_failure_stops_its_dependents_only():
    nodes = _nodes(seeds=[0, 1])
    failing = "textures-mini/ft-projector/seed0/finetune"
    outcome, _ = _walk(nodes, schedule.Capacity(2, 2), fail=[failing])
    state = {e.name: e.state for e in outcome.events}
    assert state[failing] == "failed"
    downstream = {"textures-mini/ft-projector/seed0/merge", "textures-mini/ft-projector/seed0/eval-llava",
                  "textures-mini/ft-projector/seed0/probe", "report"}
    assert {n for n, s in state.items() if s == "blocked"} == downstream
    assert all(s == "done" for n, s in state.items() if n not in downstream | {failing})
    assert "textures-mini/ft-projector/seed1/eval-llava" in state  # the other seed's chain ran to its end
    assert not outcome.ok and local.exit_code(outcome) == 1


def test_bad_input_failures_exit_64():
    nodes = _nodes(seeds=[0])
    outcome = schedule.walk(nodes, schedule.Capacity(2, 2), _BadInputPrep())
    assert [e.name for e in outcome.of("failed")] == ["textures-mini/prep"]
    assert local.exit_code(outcome) == 64
    assert {e.name for e in outcome.of("done")} == {"models/tiny", "models/clip-tiny"}


class _BadInputPrep(schedule.Simulated):
    def __init__(self):
        super().__init__(lambda n: 1.0)

    def wait(self):
        finished = super().wait()
        if finished.name.endswith("/prep"):
            return schedule.Finished(finished.name, False, "no such folder", bad_input=True)
        return finished


def test_complete_outputs_are_skipped_without_a_slot():
    nodes = _nodes(seeds=[0])
    complete = {"models/tiny", "models/clip-tiny", "textures-mini/prep"}
    outcome, _ = _walk(nodes, schedule.Capacity(1, 0),
                       complete=lambda n: {"stage": n.stage} if n.name in complete else None)
    skipped = {e.name for e in outcome.of("skipped")}
    assert skipped == complete
    assert all(e.seconds == 0 for e in outcome.of("skipped"))
    first = min((e for e in outcome.of("done")), key=lambda e: e.start)
    assert first.start == 0.0  # nothing waited for the skipped stages
    assert set(outcome.manifests) >= complete


def test_finetuning_on_several_devices_holds_them_all():
    nodes = _nodes(seeds=[0, 1])
    outcome, _ = _walk(nodes, schedule.Capacity(4, 2, finetune_devices=2))
    fts = [e for e in outcome.events if e.stage == "finetune"]
    assert all(len(e.slot.removeprefix("gpu").split("+")) == 2 for e in fts)
    for t in sorted({e.start for e in outcome.events}):
        held = sum(2 if e.stage == "finetune" else 1 for e in _running_at(outcome, t)
                   if e.slot.startswith("gpu"))
        assert held <= 4


def test_longest_work_ahead_starts_first():
    nodes = _nodes(seeds=[0], strategies=["projector", "full"])
    # Predicted costs: full fine-tuning is by far the longest; it must take the first free device slot.
    cost = {"finetune": 1.0, "eval-llava": 1.0}
    heavy = "textures-mini/ft-full/seed0/finetune"
    outcome, _ = _walk(nodes, schedule.Capacity(1, 1),
                       cost=lambda n: 100.0 if n.name == heavy else cost.get(n.stage, 1.0))
    gpu_order = [e.name for e in sorted(outcome.events, key=lambda e: e.start) if e.slot.startswith("gpu")]
    assert gpu_order[0] == heavy
    unit, _ = _walk(nodes, schedule.Capacity(1, 1))
    unit_order = [e.name for e in sorted(unit.events, key=lambda e: e.start) if e.slot.startswith("gpu")]
    assert unit_order[0] == "textures-mini/ft-projector/seed0/finetune"  # the longest chain by stage count


def test_capacity_is_checked():
    with pytest.raises(ValueError):
        schedule.Capacity(2, 0, finetune_devices=3)
    with pytest.raises(ValueError):
        schedule.Capacity(0)
