"""`mysproj bench pipeline`: the dataset-shaped fixtures (real layouts, sizes and class names) and the whole-job
benchmark end to end on the tiny presets, the same command as on a GPU, scaled down. No timing is asserted."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
from PIL import Image
from prep_helpers import read_outputs, run_prep

from mysproj import cli
from mysproj.data.shapes import SHAPES, photo_jpeg, write_dataset


def test_real_sizes_of_the_four_datasets():
    dtd = SHAPES["dtd"].counts()
    assert {s: (len(c), sum(c.values()), set(c.values())) for s, c in dtd.items()} == {
        s: (47, 1880, {40}) for s in ("train", "val", "test")}
    plantdoc = SHAPES["plantdoc"].counts()
    assert (len(plantdoc["train"]), sum(plantdoc["train"].values())) == (28, 2342)
    assert (len(plantdoc["test"]), sum(plantdoc["test"].values())) == (27, 236)
    assert "Tomato two spotted spider mites leaf" not in plantdoc["test"]
    dermnet = SHAPES["dermnet"].counts()
    assert (len(dermnet["train"]), sum(dermnet["train"].values()), sum(dermnet["test"].values())) == (23, 15557, 4002)
    assert len(SHAPES["crisismmd"].counts()["test"]) == 4


def test_scaled_counts_keep_the_split_proportions():
    assert SHAPES["dtd"].counts(classes=3, per_class=6) == {
        s: {"banded": 2, "blotchy": 2, "braided": 2} for s in ("train", "val", "test")}
    small = SHAPES["dermnet"].counts(classes=2, per_class=10)
    assert sum(small["train"].values()) == 16 and sum(small["test"].values()) == 4


def test_photo_jpegs_are_reproducible_real_size_photos():
    a, b = photo_jpeg(5, (300, 640)), photo_jpeg(6, (300, 640))
    assert a == photo_jpeg(5, (300, 640)) and a != b
    for n in range(8):
        img = Image.open(io.BytesIO(photo_jpeg(n, (300, 640))))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert 300 <= img.width <= 640 and 300 <= img.height <= 640


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fixture_is_read_by_prep(tmp_path, shape):
    source = write_dataset(SHAPES[shape], str(tmp_path / "src"), classes=2, per_class=5, workers=0)
    counts = SHAPES[shape].counts(classes=2, per_class=5)
    subset = {"crisismmd_classes": list(counts["train"])} if shape == "crisismmd" else {}
    run_prep(tmp_path / "out", dataset=shape, source=source, workers=1, **subset)
    o = read_outputs(tmp_path / "out")
    assert len(o["classes"]["classes"]) == 2
    for split in ("train", "test"):
        assert o["report"]["counts"][split]["total"] == sum(counts[split].values())
    assert o["report"]["skipped_count"] == 0


def test_bench_pipeline_runs_the_whole_job_and_logs_each_stage(tmp_path, capsys):
    work = tmp_path / "bench"
    argv = ["bench", "pipeline", "--dataset-shape", "dtd", "--model-preset", "tiny", "--classes", "3",
            "--per-class", "6", "--strategies", "projector", "--gpus", "1", "--work", str(work),
            "--set", "finetune.max_steps=2", "--set", "probe.max_epochs=2", "--set", "eval-llava.max_new_tokens=4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((work / "bench.json").read_text())
    stages = {"models/tiny", "models/clip-tiny", "dtd/prep", "dtd/zero-shot/eval-clip", "dtd/zero-shot/eval-llava",
              "dtd/zero-shot/seed0/probe", "dtd/ft-projector/seed0/finetune", "dtd/ft-projector/seed0/merge",
              "dtd/ft-projector/seed0/eval-llava", "dtd/ft-projector/seed0/probe", "report"}
    assert {r["name"] for r in result["rows"]} == stages
    assert all(r["state"] == "done" and r["stage_time"]["wall_s"] >= 0 for r in result["rows"])
    assert result["total"]["stages"] == len(stages) and result["total"]["failed"] == 0
    for name in stages:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name
    assert "total:" in printed

    # the real DTD layout; the fine-tuning writes no resumable checkpoints
    fixture = work / "data" / "dtd-c3-p6" / "dtd"
    assert len((fixture / "labels" / "train1.txt").read_text().split()) == 6
    ft = json.loads((work / "run" / "dtd/ft-projector/seed0/finetune" / "_SUCCESS.json").read_text())
    assert ft["config"]["save_checkpoints"] is False and ft["config"]["max_steps"] == 2
    assert result["stages"]["finetune:projector@dtd"]["count"] == 64  # one step of the global batch (6 examples,
    # filled up as every epoch's last step is)
    assert result["datasets"] == {"dtd": {"train": 6, "test": 6}}

    # one line per start and end, written as the run went
    lines = [json.loads(ln) for ln in (work / "bench.log").read_text().splitlines()]
    assert lines[0]["state"] == "begin" and lines[0]["fixture"]["images"] == {"train": 6, "val": 6, "test": 6}
    lines = lines[1:]
    assert len(lines) == 2 * len(stages)
    ends = [ln for ln in lines if ln["state"] == "done"]
    assert {ln["name"] for ln in ends} == stages and all(ln["time"] for ln in ends)
    report = (work / "run" / "report" / "report.md").read_text()
    assert "## Time" in report and "| `dtd/ft-projector/seed0/finetune` | finetune |" in report

    # its JSON is what the planner reads: the real-size DTD job, predicted
    assert cli.main(["run", "--plan", "--gpus", "1", "--stage-times", str(work / "bench.json"),
                     "--datasets", "dtd", "--sources", '{"dtd": "/d"}', "--strategies", "projector",
                     "--root", str(tmp_path / "other")]) == 0
    plan = capsys.readouterr().out
    assert "predicted wall time:" in plan and "no recorded time" not in plan
    assert len([ln for ln in plan.splitlines() if ln.endswith(")") and "gpu0" in ln]) == len(stages)

    # resumed (only the report made again): the stages it kept count with the times their manifests recorded
    shutil.rmtree(work / "run" / "report")
    assert cli.main([*argv, "--resume"]) == 0
    capsys.readouterr()
    resumed = json.loads((work / "bench.json").read_text())
    assert {r["name"]: r["state"] for r in resumed["rows"]} == {n: "done" if n == "report" else "skipped"
                                                                 for n in stages}
    assert set(resumed["stages"]) == set(result["stages"])
    ft = json.loads((work / "run" / "dtd/ft-projector/seed0/finetune" / "_SUCCESS.json").read_text())
    assert resumed["stages"]["finetune:projector@dtd"]["wall_s"] == ft["summary"]["time"]["wall_s"]

    # the other half on its own (as a machine with a time limit per command runs it): full fine-tuning and what
    # reads it, without the zero-shot evaluations or CLIP; the base model and prep kept from the run before
    assert cli.main([*argv[:argv.index("--strategies")], "--strategies", "full",
                     *argv[argv.index("--gpus"):], "--no-zero-shot", "--resume"]) == 0
    capsys.readouterr()
    half = {r["name"]: r["state"] for r in json.loads((work / "bench.json").read_text())["rows"]}
    assert half == {"models/tiny": "skipped", "dtd/prep": "skipped", "dtd/zero-shot/seed0/probe": "skipped",
                    "dtd/ft-full/seed0/finetune": "done", "dtd/ft-full/seed0/eval-llava": "done",
                    "dtd/ft-full/seed0/probe": "done", "report": "done"}


def test_fixture_is_reused_when_complete(tmp_path):
    from argparse import Namespace

    from mysproj.bench.pipeline import fixture

    args = Namespace(dataset_shape="crisismmd", classes=2, per_class=4, seed=0, fixture_workers=0)
    source, desc = fixture(args, str(tmp_path))
    tsv = os.path.join(source, "crisismmd_datasplit_all", "task_humanitarian_text_img_train.tsv")
    first = os.stat(tsv).st_mtime_ns
    assert fixture(args, str(tmp_path)) == (source, desc)
    assert os.stat(tsv).st_mtime_ns == first
    args.per_class = 6
    other, _ = fixture(args, str(tmp_path))
    assert other != source


@pytest.mark.s3
def test_bench_pipeline_with_weights_in_a_bucket_splits_each_stages_transfers(tmp_path, capsys, monkeypatch,
                                                                           own_s3_server_env):
    """`--weights-in s3` starts its own S3 server (SeaweedFS), runs the whole job with its root in a bucket, and every
    manifest's time says how much of the stage went to input transfer, compute and output transfer."""
    work = tmp_path / "bench"
    argv = ["bench", "pipeline", "--dataset-shape", "dtd", "--model-preset", "tiny", "--classes", "2",
            "--per-class", "6", "--strategies", "projector", "--gpus", "1", "--work", str(work),
            "--weights-in", "s3", "--set", "finetune.max_steps=1", "--set", "probe.max_epochs=1",
            "--set", "eval-llava.max_new_tokens=2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((work / "bench.json").read_text())
    assert result["weights_in"] == "s3" and result["root"] == "s3://mysproj-bench/run"
    assert result["total"]["failed"] == 0 and not (work / "run").exists()
    times = {r["name"]: r["stage_time"] for r in result["rows"]}
    assert all(t["transfer_out_s"] > 0 for t in times.values())  # every output went to the bucket
    for name in ("dtd/zero-shot/eval-llava", "dtd/ft-projector/seed0/merge", "dtd/ft-projector/seed0/eval-llava"):
        assert times[name]["transfer_in_s"] > 0, name  # a model read from it
    for t in times.values():
        assert t["transfer_in_s"] + t["compute_s"] + t["transfer_out_s"] == pytest.approx(t["wall_s"], abs=0.01)
    assert "weights in s3" in printed and "compute s" in printed
    assert "AWS_ENDPOINT_URL" not in os.environ  # the server's environment is gone with it

    # a run cut short goes on with --resume: the server starts again on the same data, the stages are kept
    assert cli.main([*argv, "--resume"]) == 0
    resumed = json.loads((work / "bench.json").read_text())
    assert {r["state"] for r in resumed["rows"]} == {"skipped"}
