"""One writer per stage output (mysproj/storage/lease.py): a second writer waits and then skips the finished output,
a killed writer's lease is taken over, an S3 lease is renewed while its writer lives, two concurrent `mysproj run`
on one root (local and S3) leave one set of outputs that all verify, and the local runner's children die with it
even when it is killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_pipeline_local import OVERRIDES

from mysproj.config.fields import load_config
from mysproj.config.stages import PrepConfig
from mysproj.errors import BadInput
from mysproj.storage import lease
from mysproj.storage import manifest as M
from mysproj.storage import uri as U

REPO = Path(__file__).resolve().parents[1]


def _cfg(out):
    return load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": str(out)}, env={})


class _Seen(logging.Handler):
    """Sets `event` once a log line containing `text` is emitted (from any thread)."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.event.set()


def _second_writer_waits_then_skips(out: str) -> None:
    seen = _Seen("is being written by")
    logging.getLogger("mysproj.storage.lease").addHandler(seen)
    logging.getLogger("mysproj.storage.lease").setLevel(logging.INFO)
    bodies: list[str] = []
    results: dict[str, dict] = {}

    def first(o):
        bodies.append("first")
        o.write_text("a.txt", "from the first writer")
        # keep writing until the second writer has seen the lease (it never does without one: then go on after 30 s)
        seen.event.wait(30)
        o.write_text("b.txt", "still the first writer")

    def second(o):
        bodies.append("second")
        o.write_text("a.txt", "from the second writer")

    try:
        t = threading.Thread(target=lambda: results.update(first=M.run_stage("prep", _cfg(out), first)))
        t.start()
        while not bodies:  # the first writer is inside its body, holding the lease
            assert t.is_alive()
            time.sleep(0.01)
        results["second"] = M.run_stage("prep", _cfg(out), second)
        t.join()
    finally:
        logging.getLogger("mysproj.storage.lease").removeHandler(seen)
    assert bodies == ["first"], bodies  # the second writer waited, found the output complete and skipped it
    assert results["second"].get("skipped")
    data = M.StageInput(out, "prep")
    assert data.read_text("a.txt") == "from the first writer" and data.read_text("b.txt") == "still the first writer"
    assert not U.exists(U.join(out, lease.LEASE))  # given back


def test_a_second_writer_of_a_local_output_waits_then_skips_it(tmp_path):
    _second_writer_waits_then_skips(str(tmp_path / "o"))


@pytest.mark.s3
def test_a_second_writer_of_an_s3_output_waits_then_skips_it(s3_env, tmp_path):
    _second_writer_waits_then_skips(f"{s3_env.create_bucket('leases')}/{tmp_path.name}/o")


def _finished_just_before_the_lease_is_taken(out: str, monkeypatch) -> None:
    """The window two concurrent runs met: this writer found no manifest, then the other one committed and gave its
    lease back before this one asked for it, so this one took the lease without waiting."""
    real, bodies = lease.held, []

    def other(o):
        bodies.append("other")
        o.write_text("a.txt", "from the other writer")

    def this(o):
        bodies.append("this")
        o.write_text("a.txt", "from this writer")

    @contextmanager
    def the_other_writer_first(uri, stage):
        monkeypatch.setattr(lease, "held", real)
        M.run_stage("prep", _cfg(out), other)
        with real(uri, stage) as h:
            yield h

    monkeypatch.setattr(lease, "held", the_other_writer_first)
    result = M.run_stage("prep", _cfg(out), this)
    assert bodies == ["other"] and result.get("skipped"), bodies
    assert M.StageInput(out, "prep").read_text("a.txt") == "from the other writer"


def test_an_output_finished_just_before_its_local_lease_is_taken_is_skipped(tmp_path, monkeypatch):
    _finished_just_before_the_lease_is_taken(str(tmp_path / "o"), monkeypatch)


@pytest.mark.s3
def test_an_output_finished_just_before_its_s3_lease_is_taken_is_skipped(s3_env, tmp_path, monkeypatch):
    _finished_just_before_the_lease_is_taken(f"{s3_env.create_bucket('leases')}/{tmp_path.name}/o", monkeypatch)


def test_a_held_lease_past_the_allowed_wait_is_one_line_naming_the_holder(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    monkeypatch.setenv("MYSPROJ_LEASE_WAIT_SECONDS", "0")
    with lease.held(out, "prep"):
        ran = []
        with pytest.raises(BadInput, match=rf"{out} is being written by prep on .* pid {os.getpid()} since "):
            M.run_stage("prep", _cfg(out), lambda o: ran.append(1))
        assert not ran
    assert M.run_stage("prep", _cfg(out), lambda o: None)["stage"] == "prep"


def _hold_in_a_process(out: str, env: dict | None = None) -> subprocess.Popen:
    code = (f"import sys, time\nfrom mysproj.storage import lease\nwith lease.held({out!r}, 'prep'):\n"
            f"    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lease_of_a_killed_local_writer_is_taken_over_at_once(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    holder = _hold_in_a_process(out)
    monkeypatch.setenv("MYSPROJ_LEASE_WAIT_SECONDS", "0")
    with pytest.raises(BadInput, match=f"pid {holder.pid}"):
        M.run_stage("prep", _cfg(out), lambda o: None)
    holder.kill()
    holder.wait()
    assert os.path.exists(os.path.join(out, lease.LEASE))  # left behind by the killed writer
    assert M.run_stage("prep", _cfg(out), lambda o: o.write_text("a.txt", "x") and None)["files"]


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_an_s3_lease_is_renewed_while_its_writer_lives_and_taken_over_once_it_is_killed(s3_env, tmp_path,
                                                                                         monkeypatch, caplog):
    out = f"{s3_env.create_bucket('leases')}/{tmp_path.name}/o"
    monkeypatch.setenv("MYSPROJ_LEASE_SECONDS", "2")
    holder = _hold_in_a_process(out, {"MYSPROJ_LEASE_SECONDS": "2"})
    # 3 lease lifetimes: a lease that were not renewed would be taken over within this wait
    monkeypatch.setenv("MYSPROJ_LEASE_WAIT_SECONDS", "6")
    with pytest.raises(BadInput, match=f"pid {holder.pid}"):
        M.run_stage("prep", _cfg(out), lambda o: None)
    holder.kill()
    holder.wait()
    monkeypatch.delenv("MYSPROJ_LEASE_WAIT_SECONDS")
    with caplog.at_level(logging.WARNING, logger="mysproj.storage.lease"):
        assert M.run_stage("prep", _cfg(out), lambda o: o.write_text("a.txt", "x") and None)["files"]
    assert "took over the lease of prep on" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert not U.exists(U.join(out, lease.LEASE))


def test_lease_settings_with_bad_values_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MYSPROJ_LEASE_WAIT_SECONDS", "soon")
    with pytest.raises(BadInput, match="MYSPROJ_LEASE_WAIT_SECONDS='soon': expected a number of seconds"):
        M.run_stage("prep", _cfg(tmp_path / "o"), lambda o: None)


# ------------------------------------------------------------------------ two `mysproj run` on one root

def _run_argv(root: str, gpus: int = 1, overrides: dict = OVERRIDES) -> list[str]:
    return [sys.executable, "-m", "mysproj", "run", "--root", root, "--gpus", str(gpus), "--strategies", "projector",
            "--no-zero-shot", "--no-probe", "--overrides", json.dumps(overrides)]


def _outputs_verified(root: str) -> list[str]:
    """The stage outputs below `root`, each file read back and checked against its manifest; no temporary file
    or lease left anywhere."""
    names = [f[: -len("/" + M.MANIFEST)] for f in U.list_files(root) if f.endswith("/" + M.MANIFEST)
             and "/checkpoints/" not in f]
    for name in names:  # every file of every output as its manifest says
        out = M.StageInput(U.join(root, name))
        for f in out.files:
            out.read_bytes(f)
    assert not [f for f in U.list_files(root) if ".tmp-" in f or f.endswith(lease.LEASE)]
    return names


def _two_runs_at_once(root: str, tmp_path, env: dict) -> None:
    logs = [open(tmp_path / f"run{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(_run_argv(root), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                              cwd=REPO) for f in logs]
    codes = [p.wait(timeout=900) for p in procs]
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
    assert codes == [0, 0], texts
    names = _outputs_verified(root)
    assert len(names) == 6, names  # models/tiny, prep, finetune, merge, eval-llava, report
    # each stage was written by one run: the other skipped it (complete) or waited for it, then skipped it
    for name in names:
        wrote = sum(t.count(f": wrote {U.join(root, name)} (") for t in texts)
        assert wrote == 1, (name, wrote, texts)


@pytest.mark.timeout(900)
def test_two_concurrent_runs_on_one_local_root_write_each_output_once(tmp_path):
    _two_runs_at_once(str(tmp_path / "root"), tmp_path, {})


@pytest.mark.s3
@pytest.mark.timeout(900)
def test_two_concurrent_runs_on_one_s3_root_write_each_output_once(s3_env, tmp_path):
    _two_runs_at_once(f"{s3_env.create_bucket('leases')}/{tmp_path.name}", tmp_path, s3_env.env())


# ------------------------------------------------------------------- the runner's children die with it

def test_a_runner_killed_with_sigkill_takes_its_stage_processes_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    harness = f"""
import sys
from mysproj.pipeline import dag, local, schedule
runner = local.ChildProcesses({str(tmp_path / "logs")!r}, schedule.Capacity(2, 2))
long_stage = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
runner.argv = lambda node, devices, spec: [sys.executable, "-c", long_stage]
runner.start(dag.Node("x/prep", "prep", {{"out": "/nowhere"}}), ())
runner.wait()
"""
    proc = subprocess.Popen([sys.executable, "-c", harness])
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()):  # the stage process is up
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can stop the child now
    proc.wait()
    deadline = time.monotonic() + 60
    while _alive(child, str(pid_file)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child, str(pid_file))
    if alive:
        os.kill(child, signal.SIGKILL)  # clean up where the runner failed to
    assert not alive


@pytest.mark.timeout(900)
def test_a_runner_killed_with_sigkill_mid_finetune_then_run_again_completes_with_one_writer(tmp_path):
    """`kill -9` of `mysproj run --gpus 2` while its fine-tuning child trains, and at once the same run again: the
    child stops at a step (parent-death signal), the re-run waits for its lease while it stops, and ends with
    every output verified; no process of the killed run outlives the re-run."""
    root = tmp_path / "root"
    overrides = {**OVERRIDES, "finetune": {**OVERRIDES["finetune"], "epochs": 10, "max_steps": 12, "log_every": 1}}
    argv = _run_argv(str(root), gpus=2, overrides=overrides)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline, training = time.monotonic() + 600, []
    while not training:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
        training = [p for p in (root / "logs").rglob("*finetune*.log")
                    if "finetune: step 1/" in p.read_text(errors="replace")]
    first.send_signal(signal.SIGKILL)
    first.wait()
    finetune = root / str(training[0].relative_to(root / "logs"))[: -len(".log")]  # a child's log: its output path
    assert not (finetune / M.MANIFEST).exists()  # killed while it was writing
    again = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 stages" in again.stdout and "4 done, 2 skipped" in again.stdout, again.stdout
    # the killed run's child stopped on the parent-death signal, at a step (both runs' children append to this log)
    assert "stopped: " in training[0].read_text(errors="replace")
    assert len(_outputs_verified(str(root))) == 6
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _alive(int(pid), str(root))]
    assert not left, left


def _alive(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()  # still our stage process, not a reused pid
    except FileNotFoundError:
        return False
