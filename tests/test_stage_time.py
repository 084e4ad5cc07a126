"""Every manifest's `time` entry (wall, GPU-seconds, throughput) and the report's Time section built from them."""

import json
import os
import sys
import types

import pytest

from mysproj.config.stages import EvalLlavaConfig, PrepConfig, ReportConfig
from mysproj.storage import manifest as M
from mysproj.storage import stage_time as T


def _prep(out, **kw):
    return PrepConfig(dataset="textures-mini", out=str(out), **kw)


def test_time_entry_uses_the_stages_own_rate_else_its_count_over_wall():
    own = T.time_entry({"processed": T.processed(100, "images", per_s=40.0)}, 5.0, 1)
    moved = {"transfer_in_s": 0.0, "compute_s": 5.0, "transfer_out_s": 0.0, "gpu_memory_gib": None}
    assert own == {"wall_s": 5.0, "gpu_s": 5.0, "throughput": 40.0, "unit": "images/s", **moved}
    counted = T.time_entry({"processed": T.processed(30, "samples")}, 2.0, 0)
    assert counted["throughput"] == 15.0 and counted["unit"] == "samples/s" and counted["gpu_s"] == 0.0
    split = T.time_entry({}, 3.0, 2, {"in": 0.5, "out": 1.0}, 7.5)
    assert split == {"wall_s": 3.0, "gpu_s": 6.0, "throughput": None, "unit": None, "transfer_in_s": 0.5,
                     "compute_s": 1.5, "transfer_out_s": 1.0, "gpu_memory_gib": 7.5}
    with pytest.raises(ValueError):
        T.processed(3, "tokens")


def test_run_stage_writes_the_time_entry(tmp_path):
    m = M.run_stage("prep", _prep(tmp_path / "o"),
                    lambda out: {"processed": T.processed(12, "images")} if out.write_text("a", "x") else None)
    t = m["summary"]["time"]
    assert set(t) == {"wall_s", "gpu_s", "throughput", "unit", "transfer_in_s", "compute_s", "transfer_out_s",
                      "gpu_memory_gib"}
    assert t["transfer_in_s"] == t["transfer_out_s"] == 0.0  # a local output: nothing moved over the network
    assert t["gpu_s"] == 0.0  # no CUDA in this process
    assert t["unit"] == "images/s" and 12 / t["throughput"] == pytest.approx(t["wall_s"], abs=0.001)
    on_disk = json.load(open(tmp_path / "o" / M.MANIFEST))
    assert on_disk["summary"]["time"] == t


class _FakeCuda:
    def __init__(self):
        self.allocations = 0
        self.reserved = self.peak = self.live = 0

    def reset_peak_memory_stats(self):
        self.peak = self.reserved

    def empty_cache(self):
        self.reserved = 0  # every tensor of the stage before was freed

    def max_memory_reserved(self):
        return self.peak

    def is_initialized(self):
        return self.allocations > 0

    def memory_allocated(self):
        return self.live

    def memory_stats(self):
        return {"allocation.all.allocated": self.allocations}


def test_gpu_seconds_count_the_processes_of_a_stage_that_allocated_cuda_memory(tmp_path, monkeypatch, caplog):
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setenv("WORLD_SIZE", "4")

    def on_gpu(gib):
        def body(out):
            cuda.allocations += 10
            cuda.peak = max(cuda.peak, gib * 2**30)
            cuda.reserved = cuda.peak  # the allocator keeps what it reserved
            out.write_text("a", "x")
        return body
    m = M.run_stage("prep", _prep(tmp_path / "gpu"), on_gpu(20))
    t = m["summary"]["time"]
    assert t["gpu_s"] == pytest.approx(4 * t["wall_s"], abs=0.002) and t["gpu_memory_gib"] == 20.0
    # the next GPU stage of the process: its own peak, not the earlier stage's
    assert M.run_stage("prep", _prep(tmp_path / "gpu2"), on_gpu(3))["summary"]["time"]["gpu_memory_gib"] == 3.0
    # a later CPU stage in the same process (CUDA initialised, memory still held) holds no GPU; tensors an
    # earlier stage still references are named as it starts
    cuda.live = 3 * 2**30
    with caplog.at_level("WARNING", logger="mysproj.storage.stage_time"):
        m = M.run_stage("prep", _prep(tmp_path / "cpu"), lambda out: out.write_text("a", "x") and None)
    assert cuda.is_initialized() and m["summary"]["time"]["gpu_s"] == 0.0
    assert m["summary"]["time"]["gpu_memory_gib"] is None
    assert "3.0 GiB of GPU memory still allocated as this stage starts" in caplog.text


def test_a_skipped_stage_keeps_the_time_of_the_run_that_wrote_it(tmp_path):
    first = M.run_stage("prep", _prep(tmp_path / "o"), lambda out: out.write_text("a", "x") and None)
    again = M.run_stage("prep", _prep(tmp_path / "o"), lambda out: pytest.fail("ran again"))
    assert again["skipped"] and again["summary"]["time"] == first["summary"]["time"]


def _stage(root, name, stage, time_entry, cfg=None):
    """A stage output with a given time entry (as `run_stage` would have written it)."""
    cfg = cfg or _prep(os.path.join(root, name))
    out = M.StageOutput(os.path.join(root, name), stage, cfg)
    out.write_json("metrics.json", {})
    out.commit({"seconds": time_entry["wall_s"], "time": time_entry} if time_entry else {"seconds": 1.5})


def test_report_time_section_lists_every_stage_and_the_totals(tmp_path):
    from mysproj.report.time_table import time_section

    root = str(tmp_path / "run")
    _stage(root, "dtd/prep", "prep", {"wall_s": 10.0, "gpu_s": 0.0, "throughput": 376.0, "unit": "images/s"})
    _stage(root, "dtd/ft-full/seed0/finetune", "finetune",
           {"wall_s": 275.0, "gpu_s": 550.0, "throughput": 9.8, "unit": "samples/s"})
    _stage(root, "models/llava-1.5-7b", "model-init", {"wall_s": 50.0, "gpu_s": 50.0, "throughput": None,
                                                       "unit": None})
    _stage(root, "dtd/zero-shot/eval-llava", "eval-llava", None)  # an output from before the time entry
    # not stage outputs of this run's table: a checkpoint's manifest, the report itself
    M.StageOutput(os.path.join(root, "dtd/ft-full/seed0/finetune/checkpoints/step-2"), "finetune-checkpoint",
                  _prep(root)).commit({"step": 2})
    _stage(root, "report", "report", {"wall_s": 2.0, "gpu_s": 0.0, "throughput": None, "unit": None})
    lines = time_section([root])
    text = "\n".join(lines)
    assert lines[0] == "## Time"
    assert "| `dtd/ft-full/seed0/finetune` | finetune | 275.0 | 550.0 | 9.80 samples/s |" in lines
    assert "| `models/llava-1.5-7b` | model-init | 50.0 | 50.0 | — |" in lines
    assert "| `dtd/prep` | prep | 10.0 | 0.0 | 376.00 images/s |" in lines
    assert "| `dtd/zero-shot/eval-llava` | eval-llava | 1.5 | — | — |" in lines
    assert "step-2" not in text and "| `report`" not in text
    assert "Total: 4 stages, 336.5 s of stage wall time (5.6 min), 600.0 GPU-seconds" in text


def test_report_stage_appends_the_time_section(tmp_path):
    from mysproj.stages import report

    root = str(tmp_path / "run")
    _stage(root, "dtd/prep", "prep", {"wall_s": 3.0, "gpu_s": 0.0, "throughput": None, "unit": None})
    metrics = {"n": 2, "accuracy": 0.5, "macro_f1": 0.4, "labels": ["a", "b"], "per_class": {}, "unparsed": 0}
    out = M.StageOutput(os.path.join(root, "dtd/zero-shot/eval-llava"), "eval-llava",
                        EvalLlavaConfig(model="/m", data=os.path.join(root, "dtd/prep"), out="x"))
    out.write_json("metrics.json", metrics)
    out.commit({"time": {"wall_s": 7.0, "gpu_s": 7.0, "throughput": 12.5, "unit": "images/s"}})
    report.run(ReportConfig(runs=[root], out=os.path.join(root, "report")))
    text = open(os.path.join(root, "report", "report.md")).read()
    section = text[text.index("## Time"):]
    assert "| `dtd/zero-shot/eval-llava` | eval-llava | 7.0 | 7.0 | 12.50 images/s |" in section
    assert "Total: 2 stages, 10.0 s of stage wall time" in section
