"""Weights & Biases in offline mode (no server): a fine-tuning and an evaluation log the same metrics as TensorBoard,
with the stage's config, into local runs that `wandb sync` would upload."""

from __future__ import annotations

import glob
import json
import os
import struct

import pytest

pytest.importorskip("wandb")
pytest.importorskip("torch")

from stage_runs import finetune, stage  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return folder


def _records(path: str):
    """The protobuf records of a W&B run file (`run-<id>.wandb`: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header: checksum, length, kind = full, first, middle, last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # the rest of the block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            yield buf


def _offline_runs(folder) -> dict[str, dict]:
    """{output URI: {"name", "group", "config", "history": [{key: value}]}} of the offline runs under `folder`."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = {}
    for path in glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb")):
        run: dict = {"history": []}
        for raw in _records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group,
                           config={i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
        found[run["config"]["out"]] = run
    return found


def test_offline_runs_hold_the_stage_config_and_metrics(offline, tiny_model, prep, llava_tiny_uri, prep_uri,
                                                       tmp_path):
    ft = str(tmp_path / "run/textures-mini/ft-projector/seed0/finetune")
    m = finetune(tiny_model, prep, ft, strategy="projector", max_steps=2, wandb_project="mysproj-test")
    assert m["summary"]["wandb"]["run_id"] and m["summary"]["wandb"]["error"] is None
    ev = str(tmp_path / "run/textures-mini/zero-shot/eval-llava")
    e = stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=ev, mode="scoring", workers=0, limit=4,
              wandb_project="mysproj-test")
    runs = _offline_runs(offline)
    assert set(runs) == {ft, ev}
    assert runs[ft]["name"] == "textures-mini/ft-projector/seed0/finetune"
    assert runs[ft]["group"] == str(tmp_path / "run")  # one pipeline run, one group
    assert runs[ft]["config"]["strategy"] == "projector"
    steps = [h for h in runs[ft]["history"] if "train/loss" in h]
    assert [h["_step"] for h in steps] == [1, 2]  # every optimizer step
    assert steps[-1]["train/loss"] == pytest.approx(m["summary"]["final_loss"], abs=1e-5)
    assert {"train/learning_rate", "train/grad_norm", "train/samples_per_s"} <= set(steps[-1])
    (evaluated,) = [h for h in runs[ev]["history"] if "eval/macro_f1" in h]
    assert evaluated["eval/macro_f1"] == pytest.approx(e["summary"]["macro_f1"], abs=1e-6)
