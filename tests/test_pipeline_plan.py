"""`mysproj run --plan`: stage times from manifests or a JSON file, scaled by item counts, through the runner's
own scheduling walk on a virtual clock."""

import json
import os

import pytest

from mysproj import cli
from mysproj.config.fields import load_config
from mysproj.config.stages import FinetuneConfig, PrepConfig
from mysproj.pipeline import dag, plan, schedule, stage_times
from mysproj.storage.manifest import StageOutput

TIMES = {"stages": {
    "model-init:llava-1.5-7b": {"wall_s": 50},
    "prep@dtd": {"wall_s": 10, "count": 3760, "throughput": 376},
    "finetune:projector@dtd": {"wall_s": 100, "count": 1880, "throughput": 20, "gpus": 1},
    "merge": {"wall_s": 40},
    "eval-llava:generate": {"wall_s": 120, "count": 1880, "throughput": 20},
    "report": {"wall_s": 2}},
    "datasets": {"dtd": {"train": 1880, "test": 1880}}}
PIPELINE = ["--datasets", "dtd,dermnet", "--sources", '{"dtd": "/d/dtd", "dermnet": "/d/dermnet"}',
            "--strategies", "projector", "--no-zero-shot", "--no-probe",
            "--model-preset", "llava-1.5-7b", "--clip-preset", "clip-vit-l-14-336"]
# DermNet at its real size (15,557 train / 4,002 test), from DTD's records: fixed part + items / throughput.
DERMNET = {"prep": (15557 + 4002) / 376, "finetune": 6 + 15557 / 20, "merge": 40, "eval-llava": 26 + 4002 / 20}


def _times() -> stage_times.StageTimes:
    return stage_times.StageTimes({k: stage_times.Record(v["wall_s"], v.get("count"), v.get("throughput"),
                                                         v.get("gpus", 0)) for k, v in TIMES["stages"].items()})


def _cfg(**kw):
    base = {"root": "/r", "datasets": ["dtd", "dermnet"], "sources": {"dtd": "/d", "dermnet": "/d"},
            "strategies": ["projector"], "zero_shot": False, "probe": False, "model_preset": "llava-1.5-7b"}
    return load_config(dag.PipelineConfig, overrides={**base, **kw}, env={})


def test_prediction_scales_the_variable_part_by_items():
    times = _times()
    nodes = {n.name: n for n in dag.build(_cfg())}
    sizes = stage_times.dataset_sizes(times, ["dermnet"])
    assert sizes == {"dermnet": {"train": 15557, "test": 4002}}  # the real size, none recorded
    for stage, expected in DERMNET.items():
        name = "dermnet/prep" if stage == "prep" else f"dermnet/ft-projector/seed0/{stage}"
        assert stage_times.predict(nodes[name], times, sizes) == pytest.approx(expected)
    # on two devices, fine-tuning's throughput doubles (the record was measured on one)
    ft = nodes["dermnet/ft-projector/seed0/finetune"]
    assert stage_times.predict(ft, times, sizes, devices=2) == pytest.approx(6 + 15557 / 40)
    assert stage_times.predict(nodes["report"], stage_times.StageTimes(), sizes) is None


def test_plan_command_prints_the_runners_schedule(tmp_path, capsys):
    src = tmp_path / "times.json"
    src.write_text(json.dumps(TIMES))
    assert cli.main(["run", "--plan", "--gpus", "1", "--stage-times", str(src), *PIPELINE]) == 0
    one = capsys.readouterr().out
    serial = 50 + (10 + 100 + 40 + 120) + sum(DERMNET.values()) + 2
    assert f"predicted wall time: {serial:.0f} s" in one

    assert cli.main(["run", "--plan", "--gpus", "2", "--stage-times", str(src), *PIPELINE]) == 0
    two = capsys.readouterr().out
    # prep on the CPU slots from 0; both fine-tunings side by side once the model and their data exist
    ft_start = DERMNET["prep"]
    wall = ft_start + DERMNET["finetune"] + DERMNET["merge"] + DERMNET["eval-llava"] + 2
    assert f"predicted wall time: {wall:.0f} s" in two
    row = [ln for ln in two.splitlines() if ln.endswith("dermnet/ft-projector/seed0/finetune (finetune)")][0]
    start, end, slot = row.split()[:3]
    assert (float(start), float(end)) == pytest.approx((ft_start, ft_start + DERMNET["finetune"]), abs=0.05)
    assert slot in ("gpu0", "gpu1")
    assert "no recorded time" not in two


def test_plan_equals_the_walk_the_runner_takes():
    cfg = _cfg()
    cap = schedule.Capacity(2, 2)
    times = _times()
    predicted = plan.predict(cfg, cap, times)
    cost = plan.stage_cost(cfg, cap, times)
    seconds = {n.name: cost(n) for n in dag.build(cfg)}
    replay = schedule.walk(dag.build(cfg), cap, schedule.Simulated(lambda n: seconds[n.name]), cost=cost)
    as_tuples = [(e.name, e.slot, e.start, e.end) for e in predicted.outcome.events]
    assert as_tuples == [(e.name, e.slot, e.start, e.end) for e in replay.events]


def _record(root, name, stage, cfg, wall, count=None, rate=None, gpus=1, summary=None, gib=None):
    out = StageOutput(os.path.join(root, name), stage, cfg)
    time = {"wall_s": wall, "gpu_s": wall * gpus, "throughput": rate, "unit": "samples/s" if rate else None,
            "gpu_memory_gib": gib}
    out.commit({**(summary or {}), "time": time,
                **({"processed": {"count": count, "unit": "samples"}} if count else {})})


def test_stage_times_from_a_run_root_average_the_seeds(tmp_path):
    root = str(tmp_path / "run")
    _record(root, "dtd/prep", "prep", PrepConfig(dataset="dtd", source="/d", out="x"), 10, 3760, 376, gpus=0,
            summary={"train": 1880, "test": 1880})
    for seed, wall, gib in ((0, 100.0, 61.5), (1, 120.0, 60.25)):
        ft = FinetuneConfig(model="/m", data="/d", out="x", strategy="full", seed=seed)
        _record(root, f"dtd/ft-full/seed{seed}/finetune", "finetune", ft, wall, 1888, 10.0, gib=gib)
    times = stage_times.from_root(root)
    assert times.datasets == {"dtd": {"train": 1880, "test": 1880}}
    rec = times.records["finetune:full@dtd"]
    assert (rec.wall_s, rec.count, rec.throughput, rec.gpus) == (110.0, 1888, 10.0, 1.0)
    assert rec.gpu_memory_gib == 61.5  # the larger peak: what a stage beside it must leave room for
    assert times.records["prep@dtd"].gpus == 0.0 and times.records["prep@dtd"].gpu_memory_gib is None
    again = tmp_path / "times.json"  # the JSON form (bench pipeline's) keeps it
    again.write_text(json.dumps(times.as_json()))
    assert stage_times.load([str(again)]).records["finetune:full@dtd"].gpu_memory_gib == 61.5


def test_bad_stage_times_file_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text('{"stages": {"merge": {"seconds": 3}}}')
    assert cli.main(["run", "--plan", "--gpus", "1", "--stage-times", str(bad), *PIPELINE]) == 64
    assert "stage times" in capsys.readouterr().err


def test_a_malformed_values_file_is_bad_input(tmp_path, capsys):
    """`mysproj run --values` reads the file as `mysproj reproduce` does: one `error:` line, not a traceback."""
    for text, why in (("pipeline: [unclosed", "not valid YAML"), ("- a list", "must be a YAML mapping"),
                      ("images: {}", "no `pipeline:` mapping")):
        values = tmp_path / "values.yaml"
        values.write_text(text)
        assert cli.main(["run", "--plan", "--gpus", "1", "--values", str(values), *PIPELINE]) == 64
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"{values}" in err and why in err and "Traceback" not in err, err
