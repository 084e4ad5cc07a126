"""TensorBoard event files in stage outputs, read back with TensorBoard's own reader: fine-tuning per optimizer step
(a killed and resumed run without duplicate or lost steps), evaluations' and probes' F1, an S3 run root."""

import json
import os

import pytest

pytest.importorskip("tensorboard")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import finetune, kill_after_checkpoint, stage, tensorboard_runs  # noqa: E402
from stage_runs import tensorboard_scalars as scalars  # noqa: E402


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_finetune_logs_every_step_and_a_resumed_run_appends_without_duplicates(tiny_model, prep, tmp_path,
                                                                                monkeypatch):
    fields = dict(strategy="full", epochs=2, max_steps=5, checkpoint_every=2, lr=1e-3, log_every=2)
    straight = str(tmp_path / "straight")
    m = finetune(tiny_model, prep, straight, **fields)
    seen = scalars(straight)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_s"} <= set(seen)
    assert [s for s, _ in seen["train/loss"]] == [1, 2, 3, 4, 5]  # every step, not only every log_every
    logged = {r["step"]: r["loss"] for r in _metrics(straight)}
    assert all(v == pytest.approx(logged[s], abs=1e-6) for s, v in seen["train/loss"] if s in logged)
    assert all(v > 0 for _, v in seen["train/grad_norm"])
    # listed (and hashed) in the manifest like every file of the output
    assert m["summary"]["tensorboard"] in m["files"]

    # Killed after checkpoint 4, whose manifest is then lost: the resumed run restarts from step 2 while the
    # event file the killed run left holds steps 1..4.
    resumed = str(tmp_path / "resumed")

    def lose_step_4(step):
        os.remove(os.path.join(resumed, "checkpoints", f"step-{step}", "_SUCCESS.json"))

    with kill_after_checkpoint(monkeypatch, 4, before_kill=lose_step_4), pytest.raises(KeyboardInterrupt):
        finetune(tiny_model, prep, resumed, **fields)
    assert [s for s, _ in scalars(resumed)["train/loss"]] == [1, 2, 3, 4]
    m = finetune(tiny_model, prep, resumed, **fields)
    assert m["summary"]["resumed_from"] == 2
    again = scalars(resumed)
    assert [s for s, _ in again["train/loss"]] == [1, 2, 3, 4, 5]
    for (s1, v1), (s2, v2) in zip(again["train/loss"], seen["train/loss"]):
        assert s1 == s2 and v1 == pytest.approx(v2, abs=1e-5)
    assert len([n for n in os.listdir(resumed) if n.startswith("events.out.tfevents.")]) == 1


def test_tensorboard_off_writes_no_event_file(tiny_model, prep, tmp_path):
    out = str(tmp_path / "off")
    finetune(tiny_model, prep, out, strategy="projector", max_steps=1, tensorboard=False)
    assert not [n for n in os.listdir(out) if "tfevents" in n]


def test_evaluations_and_probes_log_their_f1(llava_tiny_uri, clip_tiny_uri, prep_uri, tmp_path):
    root = tmp_path / "run"
    ev = str(root / "textures-mini/zero-shot/eval-llava")
    m = stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=ev, mode="generate", workers=0, limit=4,
              max_new_tokens=3)
    got = scalars(ev)
    assert got["eval/macro_f1"] == [(0, pytest.approx(m["summary"]["macro_f1"], abs=1e-6))]
    assert got["eval/unparsed"] == [(0, m["summary"]["unparsed"])]
    clip = str(root / "textures-mini/zero-shot/eval-clip")
    m = stage("eval-clip", model=clip_tiny_uri, data=prep_uri, out=clip, workers=0)
    assert scalars(clip)["eval/accuracy"] == [(0, pytest.approx(m["summary"]["accuracy"], abs=1e-6))]
    probe = str(root / "textures-mini/zero-shot/seed0/probe")
    m = stage("probe", model=llava_tiny_uri, data=prep_uri, out=probe, protocol="code", max_epochs=2, workers=0)
    got = scalars(probe)
    assert got["probe/post_macro_f1"] == [(0, pytest.approx(m["summary"]["post_macro_f1"], abs=1e-6))]
    assert "probe/pre_accuracy" in got

    # `tensorboard --logdir <root>`: one run per stage output, named by its path below the root
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(root))
    mux.Reload()
    assert set(mux.Runs()) == {"textures-mini/zero-shot/eval-llava", "textures-mini/zero-shot/eval-clip",
                               "textures-mini/zero-shot/seed0/probe"}

    # A re-run with another config replaces the event file rather than adding a second one.
    stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=ev, mode="scoring", workers=0, limit=4)
    assert len(scalars(ev)["eval/macro_f1"]) == 1


@pytest.mark.s3
def test_event_files_on_s3_are_read_by_tensorboard_through_s3_endpoint(s3_env, monkeypatch, tmp_path):
    from mysproj.config.stages import FinetuneConfig
    from mysproj.storage.manifest import StageOutput
    from mysproj.tracking.tensorboard import EventLog

    out_uri = f"{s3_env.create_bucket('tbruns')}/{tmp_path.name}/dtd/ft-projector/seed0/finetune"
    out = StageOutput(out_uri, "finetune", FinetuneConfig(model="m", data="d", out=out_uri), inputs={})
    events = EventLog(out_uri, [(1, 1000.0, {"train/loss": 2.0})])
    events.scalars(2, {"train/loss": 1.5})
    events.flush()  # what a reader sees while the run goes on: whole records only
    assert scalars(out_uri, s3=s3_env)["train/loss"] == [(1, 2.0), (2, 1.5)]
    events.scalars(3, {"train/loss": 1.25})
    name = events.close(out)
    assert name in out.files
    assert scalars(out_uri, s3=s3_env)["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    # `S3_ENDPOINT=... tensorboard --logdir s3://<run root>`: the output is one run, named by its path below the root
    root = out_uri.removesuffix("/dtd/ft-projector/seed0/finetune")
    assert tensorboard_runs(root, s3=s3_env) == {"dtd/ft-projector/seed0/finetune": ["train/loss"]}


def test_no_tracking_library_is_imported_by_a_stage_that_does_not_log_to_it(tmp_path):
    import subprocess
    import sys

    code = f"""
import sys
import mysproj.kube.controller, mysproj.kube.watch, mysproj.stages.report, mysproj.training.loop
import mysproj.stages.eval_llava, mysproj.stages.probe, mysproj.stages.eval_clip
from mysproj.config.stages import EvalClipConfig
from mysproj.storage.manifest import StageOutput
from mysproj.tracking import stage_metrics
cfg = EvalClipConfig(model="m", data="d", out={str(tmp_path / "e")!r}, tensorboard=False)
out = StageOutput(cfg.out, "eval-clip", cfg, inputs={{}})
assert stage_metrics(cfg, out, "eval-clip", {{"eval/macro_f1": 1.0}}) == {{}}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "mlflow", "wandb"))
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
