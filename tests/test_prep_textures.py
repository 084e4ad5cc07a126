import os
import subprocess
import sys

from prep_helpers import read_outputs, run_prep

from mysproj.data.images import open_rgb


def test_textures_mini_tiles_split_and_manifest(tmp_path):
    run_prep(tmp_path / "o", dataset="textures-mini")
    o = read_outputs(tmp_path / "o")
    assert o["classes"]["classes"] == ["brick", "grass", "gravel", "star field"]
    counts = o["report"]["counts"]
    assert counts["train"]["per_class"] == {c: 12 for c in o["classes"]["classes"]}
    assert counts["test"]["per_class"] == {c: 4 for c in o["classes"]["classes"]}
    # no tile is in both splits, every image is inside the output and listed in its manifest
    assert len({s["sha256"] for s in o["samples"]}) == 64
    for s in o["samples"]:
        rel = os.path.relpath(s["image"], tmp_path / "o")
        assert rel.startswith(f"images/{s['split']}/") and rel in o["manifest"]["files"]
        assert o["manifest"]["files"][rel]["sha256"] == s["sha256"]
        assert (s["width"], s["height"]) == (128, 128)
    img = open_rgb(o["samples"][0]["image"])
    assert img.mode == "RGB" and img.getextrema()[0][0] < img.getextrema()[0][1]  # real, non-flat content


def test_textures_mini_split_is_deterministic(tmp_path):
    run_prep(tmp_path / "a", dataset="textures-mini", patch_size=64, max_per_class=5)
    run_prep(tmp_path / "b", dataset="textures-mini", patch_size=64, max_per_class=5)
    a, b = read_outputs(tmp_path / "a"), read_outputs(tmp_path / "b")
    key = [(s["split"], s["relpath"], s["sha256"]) for s in a["samples"]]
    assert key == [(s["split"], s["relpath"], s["sha256"]) for s in b["samples"]]
    assert a["report"]["counts"]["train"]["per_class"]["brick"] == 5
    assert a["report"]["counts"]["test"]["per_class"]["brick"] == 5


def test_cli_textures_mini_from_a_relative_out(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "mysproj.cli", "prep", "--dataset", "textures-mini", "--out", "./runs/x/prep",
           "--workers", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "prep: done -> ./runs/x/prep" in first.stdout
    o = read_outputs(tmp_path / "runs" / "x" / "prep")
    assert all(os.path.isabs(s["image"]) for s in o["samples"])  # usable from any working directory
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "skipped (already complete)" in second.stdout
