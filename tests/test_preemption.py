"""SIGTERM (eviction, node drain) during fine-tuning: the step in flight finishes, a checkpoint is written, the process
exits with the retryable EXIT_PREEMPTED, and the retried run resumes from that checkpoint to the weights of an
undisturbed run. Under torchrun every rank stops after the same step, whichever rank got the signal. No sleeping for
timing: each wait is for visible progress (a metrics line, a process exit), under a deadline."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from stage_runs import FINETUNE_DEFAULTS, finetune, weights  # noqa: E402

from mysproj.errors import EXIT_PREEMPTED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 240.0
STEPS = 16
FIELDS = dict(strategy="full", epochs=100, max_steps=STEPS, lr=1e-3, checkpoint_every=100, log_every=1,
              global_batch=4, per_device_batch=4)


def _argv(fields: dict) -> list[str]:
    base = {**FINETUNE_DEFAULTS, **fields}  # as `finetune()` runs it in-process
    return [a for k, v in base.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _wait_for_steps(proc: subprocess.Popen, metrics: str, steps: int) -> None:
    """Until `metrics` holds `steps` lines (the run is inside its training loop) or the process ends."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"no training progress (exit {proc.poll()}): {proc.stderr.read()[-3000:]}")


def _state(out: str, step: int) -> dict:
    ckpt = os.path.join(out, "checkpoints", f"step-{step}")
    assert json.load(open(os.path.join(ckpt, "_SUCCESS.json")))["stage"] == "finetune-checkpoint"
    return json.load(open(os.path.join(ckpt, "state.json")))


def _stopped_at(stderr: str) -> int:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("stopped: "))
    step = int(line.split("after optimizer step ")[1].split()[0])
    assert line == (f"stopped: SIGTERM: fine-tuning stopped after optimizer step {step} of {STEPS}, checkpoint "
                    f"step {step} written; the same command resumes from it"), line
    return step


def test_sigterm_checkpoints_exits_retryable_and_the_rerun_resumes_bit_identical(tiny_model, prep, tmp_path,
                                                                                  caplog):
    straight = str(tmp_path / "straight")
    finetune(tiny_model, prep, straight, **FIELDS)

    out = str(tmp_path / "preempted")
    proc = subprocess.Popen([sys.executable, "-m", "mysproj.cli", "finetune", "--model", tiny_model, "--data", prep,
                             "--out", out, *_argv(FIELDS)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, os.path.join(out, "metrics.jsonl"), 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    step = _stopped_at(stderr)
    assert 2 <= step < STEPS and _state(out, step)["step"] == step
    assert not os.path.exists(os.path.join(out, "_SUCCESS.json"))

    # A checkpoint the run was writing when it died (no manifest) is discarded on resume, with one line.
    half = os.path.join(out, "checkpoints", f"step-{step + 1}")
    os.makedirs(half)
    open(os.path.join(half, "trainable.safetensors"), "wb").close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        m = finetune(tiny_model, prep, out, **FIELDS)
    assert m["summary"]["resumed_from"] == step and m["summary"]["steps"] == STEPS
    assert [r.getMessage() for r in caplog.records if "half-written" in r.getMessage()] == [
        f"finetune: discarding half-written checkpoint step-{step + 1} (no _SUCCESS.json: the run stopped while "
        f"writing it)"]
    assert not os.path.exists(half)
    a, b = weights(straight), weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(ln)["loss"] for ln in open(os.path.join(o, "metrics.jsonl"))] for o in (straight, out)]
    assert losses[0] == losses[1]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker of `rank` below `parent`, from /proc (its environment holds RANK)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def test_under_torchrun_a_sigterm_to_one_rank_stops_all_ranks_after_the_same_step(tiny_model, prep,
                                                                                    tmp_path):
    """SIGTERM reaches only rank 1 (rank 0 knows nothing): both ranks still stop after the same step, write one
    checkpoint together (each rank's RNG state in it) and exit retryable; a rerun resumes from it. The loss is the
    global-batch token mean: the only normalisation whose weights do not depend on how the batch is split."""
    fields = {**FIELDS, "loss_normalization": "global-batch"}
    single = str(tmp_path / "single")
    finetune(tiny_model, prep, single, **fields)
    out = str(tmp_path / "multi")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mysproj.cli",
           "finetune", "--model", tiny_model, "--data", prep, "--out", out, *_argv({**fields, "per_device_batch": 2})]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, os.path.join(out, "metrics.jsonl"), 2)
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, 64), stderr[-3000:]
    stops = {_stopped_at(ln) for ln in stderr.splitlines() if ln.startswith("stopped: ")}
    assert len(stops) == 1, stderr[-3000:]  # both ranks reported, the same step
    step = stops.pop()
    assert sum(ln.startswith("stopped: ") for ln in stderr.splitlines()) == 2
    assert _state(out, step)["step"] == step
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(os.listdir(os.path.join(out, "checkpoints", f"step-{step}")))
    assert not os.path.exists(os.path.join(out, "_SUCCESS.json"))

    # The retried run, here on one process (same config; the global batch is fixed, accumulation fills the gap).
    m = finetune(tiny_model, prep, out, **{**fields, "per_device_batch": 2})
    assert m["summary"]["resumed_from"] == step
    a, b = weights(single), weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_chart_gives_finetune_pods_the_grace_period_of_a_checkpoint():
    import yaml
    from test_chart import render

    docs = render("--set", "finetune.terminationGracePeriodSeconds=900")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = yaml.safe_load(cm["data"]["job-finetune.yaml"])["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert pod["terminationGracePeriodSeconds"] == 900
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == 890  # torchrun kills its workers a little before SIGKILL
    default = next(d for d in render() if d["kind"] == "ConfigMap")
    assert yaml.safe_load(default["data"]["job-finetune.yaml"])["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 600
    for kind in ("cpu", "gpu"):  # stages without checkpoints keep Kubernetes' default
        assert "terminationGracePeriodSeconds" not in yaml.safe_load(cm["data"][f"job-{kind}.yaml"])["spec"][
            "template"]["spec"]
