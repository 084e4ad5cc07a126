"""A stage's key covers its config and the content of its inputs (`StageOutput.existing()`): a re-run after an input
changed runs again and says which input changed; an output of another stage is never overwritten silently."""

from __future__ import annotations

import json
import logging
import os

import pytest
from dataset_layouts import image_bytes, make_imagefolder, write
from stage_runs import error_lines

from mysproj.cli import main
from mysproj.config.fields import load_config
from mysproj.config.stages import PrepConfig
from mysproj.storage import cache, digest
from mysproj.storage import manifest as M

PREP = ["prep", "--dataset", "textures-mini", "--patch-size", "48", "--workers", "1"]


def _stdout_state(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def _reruns(caplog, stage: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{stage}: ") and "runs again" in
            r.getMessage()]


def _reruns_logged(stderr: str, stage: str) -> list[str]:
    """The same, from what the CLI logged to stderr (`HH:MM:SS LEVEL logger: message`)."""
    return [ln.split(": ", 1)[1] for ln in stderr.splitlines() if f": {stage}: " in ln and "runs again" in ln]


def test_prep_rerun_with_other_content_makes_eval_llava_run_again(tiny_model, tmp_path, capsys):
    """The issue's case: prep re-run into the same folder with another --max-per-class, then eval-llava on it. The
    eval's config is the same; only the content of its input changed. It must run again, over the new test split."""
    prep, ev = str(tmp_path / "prep"), str(tmp_path / "eval")
    assert main([*PREP, "--out", prep, "--max-per-class", "2"]) == 0
    argv = ["eval-llava", "--model", tiny_model, "--data", prep, "--out", ev, "--mode", "scoring", "--workers", "0"]
    assert main(argv) == 0
    first = json.load(open(os.path.join(ev, "metrics.json")))
    assert main(argv) == 0 and _stdout_state(capsys) == f"eval-llava: skipped (already complete) -> {ev}"

    assert main([*PREP, "--out", prep, "--max-per-class", "3"]) == 0
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"eval-llava: done -> {ev}"
    assert _reruns_logged(err, "eval-llava") == [
        f"eval-llava: {ev} runs again: input 'data' ({prep}) changed since it was made"]
    second = json.load(open(os.path.join(ev, "metrics.json")))
    assert second["n"] > first["n"], (first["n"], second["n"])
    recorded = json.load(open(os.path.join(ev, M.MANIFEST)))["inputs"]
    assert recorded["data"] == json.load(open(os.path.join(prep, M.MANIFEST)))["digest"]


def test_pipeline_with_a_changed_finetune_reruns_everything_downstream(tiny_model, tmp_path, caplog):
    """`mysproj run` with fixed output paths: a changed fine-tuning setting re-runs the fine-tune, and so merge, the
    eval, the probe and the report whose configs did not change; what does not depend on it is skipped."""
    from mysproj.pipeline import local
    from mysproj.pipeline.dag import PipelineConfig

    overrides = {"prep": {"max_per_class": 2, "patch_size": 48, "workers": 1},
                 "finetune": {"max_steps": 1, "global_batch": 4, "per_device_batch": 4, "workers": 0, "lora_r": 4},
                 "eval-llava": {"workers": 0}, "probe": {"workers": 0, "max_epochs": 2}}
    fields = dict(root=str(tmp_path / "run"), base_model=tiny_model, strategies=["projector"], zero_shot=False,
                  eval_mode="scoring")

    def run(max_steps: int) -> dict[str, bool]:
        cfg = load_config(PipelineConfig, overrides={**fields, "overrides": {
            **overrides, "finetune": {**overrides["finetune"], "max_steps": max_steps}}}, env={})
        return {e.name: e.state == "skipped" for e in local.run(cfg).events}

    assert not any(run(1).values())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        skipped = run(2)
    ft = "textures-mini/ft-projector/seed0"
    assert skipped == {"textures-mini/prep": True, "textures-mini/zero-shot/seed0/probe": True,
                       f"{ft}/finetune": False, f"{ft}/merge": False, f"{ft}/eval-llava": False,
                       f"{ft}/probe": False, "report": False}
    root = fields["root"]
    assert _reruns(caplog, "merge") == [f"merge: {root}/{ft}/merge runs again: input 'projector' "
                                        f"({root}/{ft}/finetune) changed since it was made"]
    assert _reruns(caplog, "report") == [f"report: {root}/report runs again: input 'runs' (['{root}']) changed "
                                         f"since it was made"]
    assert all(run(2).values())  # and a third run with nothing changed skips everything, the report included


def _prep_cfg(src, out) -> PrepConfig:
    return load_config(PrepConfig, overrides={"dataset": "imagefolder", "source": str(src), "out": str(out),
                                              "workers": 1}, env={})


def test_outside_folder_is_hashed_once_and_a_changed_file_is_seen(tmp_path, monkeypatch, caplog):
    """A raw dataset folder (no manifest) is keyed by its files' names, sizes and sha256; unchanged files are not
    read again (hashes cached by path, size, mtime, ctime and inode); one changed file makes prep run again."""
    from mysproj.stages import prep

    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    hashed = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    cfg = _prep_cfg(src, tmp_path / "out")
    prep.run(cfg)
    assert len(hashed) == 6
    hashed.clear()
    assert prep.run(cfg)["skipped"] is True and hashed == []

    write(os.path.join(src, "train", "a", "img_0.jpg"), image_bytes(77))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert not prep.run(cfg).get("skipped")
    assert hashed == ["img_0.jpg"]
    assert _reruns(caplog, "prep") == [f"prep: {tmp_path / 'out'} runs again: input 'source' ({src}) changed since "
                                       f"it was made"]


def test_manifest_records_its_digest_and_its_inputs(tmp_path):
    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    out = str(tmp_path / "out")
    m = M.run_stage("prep", _prep_cfg(src, out), lambda o: o.write_text("x.txt", "x") and None)
    assert m["digest"] == digest.content_digest(m["files"]) and len(m["digest"]) == 64
    assert m["inputs"] == {"source": digest.input_digest(src)}
    # A manifest written before inputs were recorded cannot vouch for them: the stage runs again, and says why.
    legacy = {k: v for k, v in m.items() if k not in ("inputs", "digest")}
    with open(os.path.join(out, M.MANIFEST), "w") as f:
        json.dump(legacy, f)
    stage_out = M.StageOutput(out, "prep", _prep_cfg(src, out))
    assert stage_out.existing() is None
    assert stage_out.reason == "its manifest records no input digests (written by an older mysproj)"


def test_a_run_root_is_keyed_by_the_outputs_below_it_not_by_its_own_report(tmp_path):
    """The report reads a run root: its key is the digests of the stage outputs found there, leaving out the
    report's own folder (else writing the report would change its own key) and what sits inside other outputs."""
    root = tmp_path / "run"
    for name in ("a/prep", "a/zero-shot/eval-clip"):
        (root / name / "checkpoints" / "step-1").mkdir(parents=True)
        (root / name / M.MANIFEST).write_text(json.dumps({"stage": "x", "digest": name}))
        (root / name / "checkpoints" / "step-1" / M.MANIFEST).write_text(json.dumps({"digest": "inner"}))
    before = digest.input_digest(str(root), exclude=str(root / "report"))
    (root / "report").mkdir()
    (root / "report" / M.MANIFEST).write_text(json.dumps({"digest": "report"}))
    (root / "a" / "prep" / "checkpoints" / "step-1" / M.MANIFEST).write_text(json.dumps({"digest": "changed"}))
    (root / "a" / "_FAILURE.json").write_text("{}")
    assert digest.input_digest(str(root), exclude=str(root / "report")) == before
    (root / "a" / "prep" / M.MANIFEST).write_text(json.dumps({"stage": "x", "digest": "new"}))
    assert digest.input_digest(str(root), exclude=str(root / "report")) != before


def test_an_input_that_is_gone_keeps_the_output_made_from_it(tmp_path):
    """Nothing could be re-made from a deleted raw dataset: its prep output stays complete."""
    import shutil

    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    out = str(tmp_path / "out")
    M.run_stage("prep", _prep_cfg(src, out), lambda o: o.write_text("x.txt", "x") and None)
    shutil.rmtree(src)
    assert M.StageOutput(out, "prep", _prep_cfg(src, out)).existing() is not None


@pytest.mark.s3
def test_s3_outside_folder_change_makes_prep_run_again(s3_env, tmp_path, caplog):
    """On an object store the key of a raw folder is its objects' names, sizes and ETags: nothing is downloaded to
    compare, and a replaced object is seen."""
    from mysproj.stages import prep

    local = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    fs = s3_env.filesystem()
    src = f"{s3_env.create_bucket('content-keys')[5:]}/{tmp_path.name}/src"
    for root, _, names in os.walk(local):
        for n in names:
            fs.put_file(os.path.join(root, n), f"{src}/{os.path.relpath(os.path.join(root, n), local)}")
    cfg = _prep_cfg(f"s3://{src}", f"s3://{src.split('/')[0]}/{tmp_path.name}/prep")
    prep.run(cfg)
    assert prep.run(cfg)["skipped"] is True
    fs.pipe_file(f"{src}/test/b/img_0.jpg", image_bytes(4242))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert not prep.run(cfg).get("skipped")
    assert _reruns(caplog, "prep") == [f"prep: {cfg.out} runs again: input 'source' ({cfg.source}) changed since it "
                                       f"was made"]


def test_finetune_refuses_to_overwrite_a_prep_output_unless_forced(tiny_model, tmp_path, capsys):
    data, prep = str(tmp_path / "data"), str(tmp_path / "prep")
    for out in (data, prep):
        assert main([*PREP, "--out", out, "--max-per-class", "2"]) == 0
    before = open(os.path.join(prep, M.MANIFEST)).read()
    argv = ["finetune", "--model", tiny_model, "--data", data, "--out", prep, "--max-steps", "1", "--global-batch",
            "4", "--workers", "0"]
    capsys.readouterr()
    assert main(argv) == 64
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {prep} holds a complete 'prep' output; refusing to overwrite it with finetune: pick "
                   f"another --out, or pass --force to replace it"]
    assert open(os.path.join(prep, M.MANIFEST)).read() == before
    assert main([*argv, "--force"]) == 0
    assert json.load(open(os.path.join(prep, M.MANIFEST)))["stage"] == "finetune"
