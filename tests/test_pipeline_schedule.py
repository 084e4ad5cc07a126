"""The runner's scheduling rule on simulated device slots: dependency order, the concurrency cap, failure
isolation, resume, multi-device fine-tuning and the priority of long chains."""

import pytest

from mysproj.config.fields import load_config
from mysproj.errors import BadInput
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


# Peak GiB per stage kind as a run on one 141 GB card records them (the shape of the DTD job's records).
MEMORY = {"model-init": 14.0, "finetune": 60.0, "eval-clip": 3.0, "eval-llava": 30.0, "probe": 4.0}


def _shared_walk(nodes, share, device_gib=140.0, memory=None, devices=1, cpu=1):
    memory = memory if memory is not None else (lambda n: MEMORY.get(n.stage) if n.gpu else None)
    executor = schedule.Simulated(lambda n: DURATION[n.stage])
    cap = schedule.Capacity(devices, cpu, share=share, device_gib=device_gib)
    return schedule.walk(nodes, cap, executor, memory=memory), executor


def _overlaps(outcome):
    """Pairs of one-device stages that ran at the same time on the same device."""
    done = [e for e in outcome.events if e.state == "done" and e.slot.startswith("gpu")]
    return [(a, b) for i, a in enumerate(done) for b in done[i + 1:]
            if a.slot == b.slot and a.start < b.end and b.start < a.end]


def _peak_on_device(outcome, memory):
    """The most memory (with contexts) that stages side by side on gpu0 were counted as holding."""
    starts = sorted({e.start for e in outcome.events if e.state == "done"})
    together = [[e for e in _running_at(outcome, t) if e.slot == "gpu0"] for t in starts]
    return max(sum(memory(e) + schedule.CONTEXT_GIB for e in now) for now in together if len(now) > 1)


def test_a_shared_device_runs_stages_side_by_side_within_its_memory():
    nodes = _nodes(seeds=[0], strategies=["projector", "full"])
    alone, _ = _shared_walk(nodes, share=1)
    shared, executor = _shared_walk(nodes, share=3)
    assert alone.ok and shared.ok and not _overlaps(alone)
    pairs = _overlaps(shared)
    assert pairs and executor.peak >= 2
    assert shared.wall_s < alone.wall_s
    assert _peak_on_device(shared, lambda e: MEMORY.get(e.stage, 0.0)) <= 140.0 * schedule.FILL
    for t in sorted({e.start for e in shared.events}):  # never more than `share` stages on the device
        assert len([e for e in _running_at(shared, t) if e.slot == "gpu0"]) <= 3
    ends = {e.name: e.end for e in shared.events}
    starts = {e.name: e.start for e in shared.events}
    assert all(starts[n.name] >= ends[d] for n in nodes for d in n.deps)  # dependencies still hold


def test_stages_whose_memory_does_not_fit_or_is_unknown_do_not_share():
    nodes = _nodes(seeds=[0], strategies=["projector", "full"])
    # on a 64 GiB card the 60 GiB fine-tunings fit nothing beside them; the small stages still pair up
    small, _ = _shared_walk(nodes, share=4, device_gib=64.0)
    pairs = _overlaps(small)
    assert pairs and small.ok
    assert not [p for p in pairs if "finetune" in (p[0].stage, p[1].stage)]
    assert _peak_on_device(small, lambda e: MEMORY.get(e.stage, 0.0)) <= 64.0 * schedule.FILL
    unknown, _ = _shared_walk(nodes, share=4, memory=lambda n: None)  # no record: no stage shares
    assert not _overlaps(unknown)
    no_card, _ = _shared_walk(nodes, share=4, device_gib=0.0)
    assert not _overlaps(no_card)


def test_a_free_device_is_taken_before_a_busy_one_and_multi_device_finetuning_is_not_shared():
    nodes = _nodes(seeds=[0, 1])
    cap = schedule.Capacity(4, 2, finetune_devices=2, share=2, device_gib=140.0)
    outcome = schedule.walk(nodes, cap, schedule.Simulated(lambda n: DURATION[n.stage]),
                            memory=lambda n: MEMORY.get(n.stage) if n.gpu else None)
    assert outcome.ok
    multi = [e for e in outcome.events if "+" in e.slot]
    assert multi and all(e.stage == "finetune" for e in multi)
    for a, b in _overlaps(outcome):
        assert "+" not in a.slot and "+" not in b.slot
        t = max(a.start, b.start)  # when the second joined, every device was busy
        busy = {e.slot for e in _running_at(outcome, t) if e.slot.startswith("gpu") and e not in (a, b)}
        held = {d for s in busy for d in s.removeprefix("gpu").split("+")}
        assert len(held | {a.slot.removeprefix("gpu")}) == 4
    with pytest.raises(ValueError):
        schedule.Capacity(1, share=0)
    with pytest.raises(BadInput, match="--device-gib"):  # sharing without the card's memory: one clear line
        local.capacity(1, share=2)
    assert local.capacity(1, share=2, device_gib=80.0).cpu == 1  # CPU stages then run beside, as with 2+ slots
