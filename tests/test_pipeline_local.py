"""The local runner with two device slots on the CPU: real stages in child processes, side by side, a failing
dataset stopping only its own stages, the exit code saying so, and a re-run skipping what is complete."""

import json
import os

from mysproj import cli
from mysproj.pipeline import local

OVERRIDES = {"finetune": {"max_steps": 1, "global_batch": 4, "workers": 0},
             "eval-llava": {"limit": 4, "max_new_tokens": 4, "workers": 0, "batch_size": 4},
             "prep": {"max_per_class": 4, "workers": 1}}


def _logs(log_dir):
    """Stage output -> the text of its child process's log."""
    out = {}
    for base, _, files in os.walk(log_dir):
        for f in files:
            if f.endswith(".log"):
                rel = os.path.relpath(os.path.join(base, f), log_dir)[: -len(".log")]
                out[rel] = open(os.path.join(base, f)).read()
    return out


def test_two_slots_run_stages_side_by_side_and_a_failure_stops_its_dependents_only(tmp_path, capsys):
    from mysproj.config.fields import load_config
    from mysproj.pipeline.dag import PipelineConfig

    root = tmp_path / "run"
    cfg = load_config(PipelineConfig, env={}, overrides={
        "root": str(root), "datasets": ["textures-mini", "dtd"], "sources": {"dtd": str(tmp_path / "no-such-dtd")},
        "strategies": ["projector", "full"], "zero_shot": False, "probe": False, "overrides": OVERRIDES})
    outcome = local.run(cfg, gpus=2)
    state = {e.name: e for e in outcome.events}
    assert local.exit_code(outcome) == 64  # the only failure is bad input: the DTD source does not exist
    assert [e.name for e in outcome.of("failed")] == ["dtd/prep"]
    assert "exit code 64" in state["dtd/prep"].error and "logs/dtd/prep.log" in state["dtd/prep"].error
    assert {e.name for e in outcome.of("blocked")} == {
        "dtd/ft-projector/seed0/finetune", "dtd/ft-full/seed0/finetune", "dtd/ft-projector/seed0/merge",
        "dtd/ft-projector/seed0/eval-llava", "dtd/ft-full/seed0/eval-llava", "report"}

    done = ["models/tiny", "textures-mini/prep", "textures-mini/ft-projector/seed0/finetune",
            "textures-mini/ft-full/seed0/finetune", "textures-mini/ft-projector/seed0/merge",
            "textures-mini/ft-projector/seed0/eval-llava", "textures-mini/ft-full/seed0/eval-llava"]
    manifests = {n: json.load(open(root / n / "_SUCCESS.json")) for n in done}
    for n, m in manifests.items():
        assert set(m["summary"]["time"]) == {"wall_s", "gpu_s", "throughput", "unit", "transfer_in_s", "compute_s",
                                             "transfer_out_s", "gpu_memory_gib"}, n
    assert manifests["textures-mini/ft-full/seed0/eval-llava"]["summary"]["time"]["unit"] == "images/s"
    for blocked in ("dtd/ft-full/seed0/finetune", "dtd/ft-projector/seed0/merge", "report"):
        assert not (root / blocked).exists()

    logs = _logs(root / "logs")
    assert set(logs) == {*done, "dtd/prep"}  # one process per stage that ran, none for blocked ones
    assert "error:" in logs["dtd/prep"]
    spec = json.load(open(root / "logs" / "textures-mini/ft-full/seed0/finetune.json"))
    assert spec["stage"] == "finetune" and spec["config"]["strategy"] == "full"

    # `tensorboard --logdir <root>` shows each fine-tuning's loss and each evaluation's F1, one run per output.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer().AddRunsFromDirectory(str(root))
    board.Reload()
    tags = {run: set(t["scalars"]) for run, t in board.Runs().items()}
    assert {run for run, t in tags.items() if "train/loss" in t} == {
        "textures-mini/ft-projector/seed0/finetune", "textures-mini/ft-full/seed0/finetune"}
    assert {run for run, t in tags.items() if "eval/macro_f1" in t} == {
        "textures-mini/ft-projector/seed0/eval-llava", "textures-mini/ft-full/seed0/eval-llava"}

    # The two fine-tunings became ready together (model and data done) and two device slots were free: they ran
    # at the same time, each in its own slot.
    proj, full = (state[f"textures-mini/ft-{s}/seed0/finetune"] for s in ("projector", "full"))
    assert proj.start < full.end and full.start < proj.end
    assert {proj.slot, full.slot} == {"gpu0", "gpu1"}
    assert all(e.state == "done" for e in outcome.events if e.name in done)

    # A re-run of what completed, from the command line, skips every stage: no child process starts.
    assert cli.main(["run", "--root", str(root), "--gpus", "2", "--strategies", "projector,full", "--no-zero-shot",
                     "--no-probe", "--overrides", json.dumps(OVERRIDES), "--only", "models,textures-mini"]) == 0
    assert "7 stages in 0 s on 2 device slot(s): 7 skipped" in capsys.readouterr().out
    assert _logs(root / "logs") == logs


def test_slot_processes_see_their_devices_only(tmp_path, monkeypatch):
    from mysproj.pipeline import dag, schedule

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    runner = local.ChildProcesses(str(tmp_path), schedule.Capacity(3, 3))
    try:
        gpu = dag.Node("dtd/zero-shot/eval-llava", "eval-llava", {})
        cpu = dag.Node("dtd/prep", "prep", {})
        assert runner._env(gpu, (1,))["CUDA_VISIBLE_DEVICES"] == "6"
        assert runner._env(dag.Node("f", "finetune", {}), (0, 2))["CUDA_VISIBLE_DEVICES"] == "4,7"
        assert runner._env(cpu, ())["CUDA_VISIBLE_DEVICES"] == ""
        # A stage Job's variables left in this shell would make the child write a failure record where they point.
        monkeypatch.setenv("MYSPROJ_OUT", str(tmp_path / "somewhere"))
        monkeypatch.setenv("MYSPROJ_NODE", "x")
        assert not set(runner._env(cpu, ())) & {"MYSPROJ_OUT", "MYSPROJ_NODE"}
    finally:
        runner.close()  # gives SIGTERM back its handler


def test_a_stage_process_exits_like_a_stage_job(tmp_path, monkeypatch, capsys):
    """Bad input 64 with its message redacted, preemption 143: the stage Job's contract, not a re-implementation."""
    from mysproj.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadInput, Preempted
    from mysproj.pipeline import stage_process
    from mysproj.stages import registry

    spec = tmp_path / "spec.json"
    config = {"dataset": "textures-mini", "out": str(tmp_path / "out")}
    spec.write_text(json.dumps({"name": "textures-mini/prep", "stage": "prep", "config": config}))

    def bad(stage, cfg):
        raise BadInput(f"source s3://AKIAEXAMPLE:hunter2secret@bucket/dtd of {stage}: no such folder")

    monkeypatch.setattr(registry, "run", bad)
    assert stage_process.main([str(spec)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error: source s3://***@bucket/dtd of prep: no such folder" in err and "hunter2secret" not in err

    def preempted(stage, cfg):
        raise Preempted("SIGTERM at step 3")

    monkeypatch.setattr(registry, "run", preempted)
    assert stage_process.main([str(spec)]) == EXIT_PREEMPTED


def test_multi_device_fine_tuning_runs_under_torchrun():
    from mysproj.pipeline import dag

    ft, ev = dag.Node("f", "finetune", {}), dag.Node("e", "eval-llava", {})
    argv = local.ChildProcesses.argv(ft, (2, 3), "spec.json")
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "mysproj.pipeline.stage_process", "spec.json"]
    assert local.ChildProcesses.argv(ft, (1,), "s")[1:] == ["-m", "mysproj.pipeline.stage_process", "s"]
    assert local.ChildProcesses.argv(ev, (0, 1), "s")[1:] == ["-m", "mysproj.pipeline.stage_process", "s"]


def test_a_terminated_runner_stops_its_children(tmp_path):
    """SIGTERM (a time limit, `kill`) to the runner must not leave its stage processes running on the GPUs."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    harness = f"""
import sys
from mysproj.pipeline import dag, local, schedule
runner = local.ChildProcesses({str(tmp_path / "logs")!r}, schedule.Capacity(2, 2))
long_stage = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
runner.argv = lambda node, devices, spec: [sys.executable, "-c", long_stage]
try:
    runner.start(dag.Node("x/prep", "prep", {{"out": "/nowhere"}}), ())
    runner.wait()
finally:
    runner.close()
"""
    proc = subprocess.Popen([sys.executable, "-c", harness])
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()):  # the stage process is up
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    try:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            alive = str(pid_file).encode() in f.read()  # still our stage process, not a reused pid
    except FileNotFoundError:
        alive = False
    if alive:
        os.kill(child, signal.SIGKILL)  # clean up where the runner failed to
    assert not alive


def test_one_shared_device_runs_stages_side_by_side_where_their_recorded_memory_fits(tmp_path, capsys):
    from mysproj.config.fields import load_config
    from mysproj.pipeline import stage_times
    from mysproj.pipeline.dag import PipelineConfig

    # Peaks as a 26 GiB card recorded them: a fine-tuning leaves room only for a stage that held no GPU (merge);
    # two evaluations fit together.
    peaks = {"finetune:projector": (1, 20.0), "eval-llava:generate": (1, 8.0), "merge": (0, None)}
    path = tmp_path / "times.json"
    path.write_text(json.dumps({"stages": {k: {"wall_s": 1.0, "gpus": g, "gpu_memory_gib": m}
                                           for k, (g, m) in peaks.items()}}))
    times = stage_times.load([str(path)])
    root = tmp_path / "run"
    cfg = load_config(PipelineConfig, env={}, overrides={
        "root": str(root), "seeds": [0, 1], "strategies": ["projector"], "zero_shot": False, "probe": False,
        "overrides": OVERRIDES})
    outcome = local.run(cfg, gpus=1, share=2, device_gib=26.0, memory=lambda n: stage_times.memory(n, times))
    assert outcome.ok and local.exit_code(outcome) == 0
    on_gpu = [e for e in outcome.events if e.state == "done" and e.slot == "gpu0"]
    together = [{a.stage, b.stage} for i, a in enumerate(on_gpu) for b in on_gpu[i + 1:]
                if a.start < b.end and b.start < a.end]
    # the first merge ran in its own process beside the second fine-tuning, on the same device
    assert {"finetune", "merge"} in together
    assert {"finetune", "eval-llava"} not in together and {"finetune"} not in together
    assert len(_logs(root / "logs")) == len(outcome.events)  # child processes, not this one

    # the plan of the same run predicts the sharing, and says the rule it assumed
    assert cli.main(["run", "--plan", "--root", str(root), "--seeds", "0,1", "--strategies", "projector",
                     "--no-zero-shot", "--no-probe", "--gpus", "1", "--share-gpu", "2", "--device-gib", "26",
                     "--stage-times", str(path)]) == 0
    assert "up to 2 stages a device where their recorded memory fits 26 GiB" in capsys.readouterr().out
    assert cli.main(["run", "--root", str(root), "--gpus", "1", "--share-gpu", "2", "--device-gib", "26"]) == 64
    assert "--share-gpu 2 needs --stage-times" in capsys.readouterr().err
