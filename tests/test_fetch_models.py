"""Weights named by hf:// origins, served by a real hub endpoint on loopback (olah): the pipeline fetches the CLIP
tower and the original-layout LLaVA (pickled shards) once, stages them as safetensors, and every later stage reads
them as it reads any model folder."""

from __future__ import annotations

import json

import pytest
from hub_models import clip_files, llava_original_files
from stage_runs import cli

from mysproj.models.loading import load_llava
from mysproj.storage.manifest import read_manifest

pytestmark = pytest.mark.slow


def test_a_run_from_hub_origins_fetches_converts_and_uses_the_weights(tmp_path, hf_hub, capsys, monkeypatch):
    clip_commit = hf_hub.add_repo("mysproj-tests/clip-tower", clip_files())
    llava_commit = hf_hub.add_repo("mysproj-tests/llava-original", llava_original_files())
    clip = f"hf://mysproj-tests/clip-tower@{clip_commit}"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "root": str(tmp_path / "runs/a"), "datasets": ["textures-mini"], "strategies": [], "probe": False,
        "base_model": f"hf://mysproj-tests/llava-original@{llava_commit}", "clip_model": clip,
        "vision_tower": clip,
        "overrides": {"prep": {"max_per_class": 2, "patch_size": 64},
                      "eval-llava": {"limit": 4, "max_new_tokens": 2, "workers": 0},
                      "eval-clip": {"workers": 0}}}))
    rc, errors, text = cli(["run", "--config", config], capsys)
    assert rc == 0, errors
    fetched = sorted((tmp_path / "runs/cache/sources").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in fetched] == ["clip-tower", "llava-original"]
    clip_out, llava_out = (str(p) for p in fetched)
    llava = read_manifest(llava_out)
    assert llava["stage"] == "fetch" and llava["summary"]["layout"] == "hf"
    assert llava["summary"]["converted_from"] == "original"
    assert llava["summary"]["origins"][0]["revision"] == llava_commit
    assert not [f for f in llava["files"] if f.endswith(".bin")]
    assert read_manifest(str(tmp_path / "runs/a/textures-mini/zero-shot/eval-llava"))["stage"] == "eval-llava"
    assert read_manifest(str(tmp_path / "runs/a/textures-mini/zero-shot/eval-clip"))["stage"] == "eval-clip"
    # the staged model is the released one: the same weights as loading the snapshot with its tower
    staged = load_llava(llava_out)
    assert not staged.random_weights and staged.model.config.vision_config.image_size > 0
    # a second run root on the same cache fetches nothing: the hub is out of reach and nothing notices
    before = {p.name: read_manifest(str(p))["finished"] for p in fetched}
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    config.write_text(config.read_text().replace("runs/a", "runs/b"))
    rc, errors, text = cli(["run", "--config", config, "--only", "fetch/,textures-mini/prep"], capsys)
    assert rc == 0, errors
    assert {p.name: read_manifest(str(p))["finished"] for p in fetched} == before
