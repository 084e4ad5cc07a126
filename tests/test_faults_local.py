"""Fault injection that needs no cluster: the real S3 server stopped for ~20 s in the middle of a
stage, a truncated fine-tuning checkpoint (half-written, and committed then truncated), a manifest whose hash does
not match its file, a dataset path escaping its root through the stage's Job entry point.

Each case is bounded (fixed downtime, pytest-timeout) and asserts either that the run completes with the same
artifacts as an undisturbed run, or that it fails fast with one clear line and the non-retryable exit code, and in
every case that nothing partial is ever readable as complete. Cases covered elsewhere and not repeated here: a
server killed mid-write (tests/test_prep_s3.py), kill + resume of fine-tuning to identical weights
(tests/test_finetune.py, tests/test_finetune_s3.py), wrong credentials in-process (tests/test_prep_s3.py), corrupt
images (tests/test_prep_dtd.py, tests/test_data_units.py). The cluster cases are in tests/kube/test_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dataset_layouts import make_dtd
from stage_runs import cli, kill_after_checkpoint

from mysproj.errors import EXIT_BAD_INPUT
from mysproj.storage import list_files, remove
from mysproj.storage.manifest import MANIFEST, StageInput, StageOutput, read_manifest

REPO = Path(__file__).resolve().parents[1]
OUTAGE_SECONDS = 20.0  # how long the S3 server stays down: the fault itself, not a wait for something


def _files(uri: str) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in StageInput(uri).files.items()}


# ----------------------------------------------------------------------------------- S3 down ~20 s mid-stage

@pytest.mark.s3
@pytest.mark.timeout(300)
def test_s3_down_for_20s_mid_stage_then_back_completes_with_the_same_artifacts(s3_env, tmp_path, monkeypatch,
                                                                                capsys):
    """prep writes to S3; just before it writes llava_train.json the server is stopped (SIGTERM, as a rolling
    restart does) and started again 20 s later. The stage's storage retries with backoff ride it out; the output
    is byte-identical to an undisturbed run at the same URI, and nothing is complete while the server is down."""
    out = f"{s3_env.create_bucket('faults')}/{tmp_path.name}/textures-mini/prep"
    argv = ["prep", "--dataset", "textures-mini", "--out", out, "--max-per-class", "3", "--patch-size", "48",
            "--workers", "1"]
    from mysproj.cli import main

    assert main(argv) == 0
    undisturbed = _files(out)
    remove(out, recursive=True)
    assert read_manifest(out) is None and not [f for f in list_files(out) if f.endswith(".json")]

    original = StageOutput.write_bytes
    events: dict[str, object] = {}

    def outage_then_write(self, name, data):
        if name == "llava_train.json" and "stopped" not in events:
            events["complete_before"] = read_manifest(out) is not None
            s3_env.stop()
            events["stopped"] = True
            restart = threading.Timer(OUTAGE_SECONDS, lambda: (s3_env.start(), events.setdefault("restarted", True)))
            restart.daemon = True
            restart.start()
            events["timer"] = restart
        return original(self, name, data)

    monkeypatch.setattr(StageOutput, "write_bytes", outage_then_write)
    capsys.readouterr()
    try:
        assert main(argv) == 0
    finally:
        timer = events.get("timer")
        if timer is not None:
            timer.join(OUTAGE_SECONDS + 60)  # always leave the shared server running for the next test
    assert events.get("stopped") and events.get("restarted")
    assert events["complete_before"] is False  # half-written while down: never visible as complete
    retries = [line for line in capsys.readouterr().err.splitlines() if "retrying in" in line]
    assert retries and any("llava_train.json" in m for m in retries), retries  # it was the backoff that saved it
    assert _files(out) == undisturbed  # same files, same bytes


# ----------------------------------------------------------------------------------- truncated checkpoints

def _finetune_argv(model: str, data: str, out: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data, "--out", out, "--strategy", "projector", "--max-steps",
            "3", "--global-batch", "4", "--per-device-batch", "2", "--workers", "0", "--checkpoint-every", "1",
            "--keep-checkpoints", "3", "--log-every", "1"]


def _trainable(out: str) -> dict:
    from stage_runs import weights

    return weights(out)


@pytest.mark.timeout(600)
def test_truncated_checkpoints(tiny_model, prep, tmp_path, monkeypatch, capsys):
    """(a) Killed while writing checkpoint 2 (file truncated, no manifest): the restart ignores it, resumes from
    step 1 and ends with the same weights as an undisturbed run. (b) A committed checkpoint whose file was
    truncated afterwards: one clear line, exit 64 (retrying cannot help), no final manifest."""
    import torch

    straight = str(tmp_path / "straight")
    rc, errors, printed = cli(_finetune_argv(tiny_model, prep, straight), capsys)
    assert rc == 0, printed

    killed = str(tmp_path / "killed")

    def truncate_while_writing(step):
        folder = Path(killed, "checkpoints", f"step-{step}")
        (folder / MANIFEST).unlink()  # the manifest is written last: a kill before it leaves none
        blob = folder / "trainable.safetensors"
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 3])

    with kill_after_checkpoint(monkeypatch, 2, before_kill=truncate_while_writing):
        rc, _, _ = cli(_finetune_argv(tiny_model, prep, killed), capsys)
    assert rc == 130 and read_manifest(killed) is None
    rc, errors, printed = cli(_finetune_argv(tiny_model, prep, killed), capsys)
    assert rc == 0, printed
    assert read_manifest(killed)["summary"]["resumed_from"] == 1
    a, b = _trainable(straight), _trainable(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    corrupt = str(tmp_path / "corrupt")

    with kill_after_checkpoint(monkeypatch, 2):
        assert cli(_finetune_argv(tiny_model, prep, corrupt), capsys)[0] == 130
    blob = Path(corrupt, "checkpoints", "step-2", "trainable.safetensors")
    blob.write_bytes(blob.read_bytes()[:100])
    rc, errors, printed = cli(_finetune_argv(tiny_model, prep, corrupt), capsys)
    assert rc == EXIT_BAD_INPUT, printed
    assert len(errors) == 1 and "step-2" in errors[0] and "trainable.safetensors" in errors[0], printed
    assert "Traceback" not in printed
    assert read_manifest(corrupt) is None  # nothing written as complete


# ----------------------------------------------------------------------------------- manifest hash mismatch

@pytest.mark.timeout(300)
def test_a_file_changed_after_its_manifest_fails_the_reader_with_one_line(tmp_path, capsys):
    """A prep output whose classes.json was altered after the manifest (same size, one letter): the next stage
    refuses it with one line naming the file, exit 64, and writes nothing as complete."""
    from mysproj.cli import main

    data, clip, out = (str(tmp_path / n) for n in ("prep", "clip", "eval"))
    assert main(["prep", "--dataset", "textures-mini", "--out", data, "--max-per-class", "2", "--patch-size", "32",
                 "--workers", "1"]) == 0
    assert main(["model", "init", "--preset", "clip-tiny", "--out", clip]) == 0
    target = Path(data, "classes.json")
    text = target.read_text()
    classes = json.loads(text)["classes"]
    changed = text.replace(classes[0], classes[0][:-1] + ("x" if classes[0][-1] != "x" else "y"), 1)
    assert len(changed) == len(text) and changed != text
    target.write_text(changed)
    rc, errors, printed = cli(["eval-clip", "--model", clip, "--data", data, "--out", out, "--arch", "ViT-L-14-336",
                               "--workers", "0", "--batch-size", "4"], capsys)
    assert rc == EXIT_BAD_INPUT, printed
    assert len(errors) == 1 and "classes.json" in errors[0] and "sha256 does not match" in errors[0], printed
    assert "Traceback" not in printed
    assert read_manifest(out) is None


# ----------------------------------------------------------------------------------- dataset path escaping root

@pytest.mark.timeout(120)
def test_dataset_path_escaping_its_root_fails_the_job_entry_point(tmp_path):
    """What a prep pod runs (`python -u jobs/stage.py prep`, config from MYSPROJ_* env): a split file naming a path
    outside the dataset root exits 64 with one line, records the reason for the controller, writes no manifest."""
    src = make_dtd(str(tmp_path / "src"))
    with open(os.path.join(src, "labels", "test1.txt"), "a") as f:
        f.write("banded/../../../outside.jpg\n")
    (tmp_path / "outside.jpg").write_bytes(b"not for us")
    out = tmp_path / "runs" / "dtd" / "prep"
    env = {**os.environ, "MYSPROJ_DATASET": "dtd", "MYSPROJ_SOURCE": src, "MYSPROJ_OUT": str(out),
           "MYSPROJ_WORKERS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-u", "jobs/stage.py", "prep"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=110)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_BAD_INPUT, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "escapes the dataset root" in errors[0] and "test1.txt" in errors[0], output
    assert "Traceback" not in output
    assert not (out / MANIFEST).exists()
    record = json.loads((out / "_FAILURE.json").read_text())
    assert record["exit_code"] == EXIT_BAD_INPUT and "escapes the dataset root" in record["error"]
