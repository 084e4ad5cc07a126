"""One process contract (mysproj/process.py): `mysproj <stage>` and the Job running that stage (`jobs/stage.py
<stage>`) end alike on the same failure: the same exit code, the same line, the same failure record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mysproj import cli, process
from mysproj.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadInput, Preempted, StorageError
from mysproj.kube import entry
from mysproj.stages import registry

REPO = Path(__file__).resolve().parents[1]
FAILURES = {  # what the stage raises -> the exit code both faces give
    "bad-input": (BadInput("source /data/dtd: no such folder; pass --source"), EXIT_BAD_INPUT),
    "preempted": (Preempted("checkpoint saved at step 3"), EXIT_PREEMPTED),
    "ctrl-c": (KeyboardInterrupt(), process.EXIT_INTERRUPTED),
    "storage": (StorageError("s3://b/x: endpoint unreachable for 60 s"), process.EXIT_RETRYABLE),
    "disk-full": (OSError(28, "No space left on device", "/out/x"), process.EXIT_RETRYABLE),
    "no-module": (ModuleNotFoundError("No module named 'torch'", name="torch"), EXIT_BAD_INPUT),
    "crash": (RuntimeError("unexpected AWS_SECRET_ACCESS_KEY=hunter2-secret"), process.EXIT_RETRYABLE),
}


def _ends(run, out: Path, capsys) -> tuple[int, list[str], dict | None]:
    code = run()
    lines = [line for line in capsys.readouterr().err.splitlines() if not line[:2].isdigit()]  # not log lines
    record = out / process.FAILURE_RECORD
    found = json.loads(record.read_text()) if record.exists() else None
    if found:
        record.unlink()
        found = {k: v for k, v in found.items() if k not in ("time", "host")}
    return code, lines[-1:], found


@pytest.mark.parametrize("kind", FAILURES)
def test_the_cli_and_the_job_end_alike(kind, tmp_path, monkeypatch, capsys):
    failure, expected = FAILURES[kind]
    out = tmp_path / "out"
    monkeypatch.setenv("MYSPROJ_DATASET", "textures-mini")
    monkeypatch.setenv("MYSPROJ_OUT", str(out))  # a Job's output: both keep the failure record there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-secret")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    out.mkdir()

    def fail(stage, cfg, force=False):
        raise failure

    monkeypatch.setattr(registry, "run", fail)
    by_cli = _ends(lambda: cli.main(["prep"]), out, capsys)
    by_job = _ends(lambda: entry.main(["prep"], script=str(REPO / "jobs" / "stage.py")), out, capsys)
    assert by_cli == by_job
    code, line, record = by_cli
    assert code == expected
    assert "hunter2-secret" not in json.dumps(by_cli)
    assert (record is None) == (kind == "ctrl-c")  # an interrupted run is no failure to explain
    if record:
        assert record["exit_code"] == expected


def test_a_real_bad_input_ends_alike(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("MYSPROJ_DATASET", "dtd")
    monkeypatch.setenv("MYSPROJ_SOURCE", str(tmp_path / "missing"))
    monkeypatch.setenv("MYSPROJ_OUT", str(out))
    by_cli = _ends(lambda: cli.main(["prep"]), out, capsys)
    by_job = _ends(lambda: entry.main(["prep"], script=str(REPO / "jobs" / "stage.py")), out, capsys)
    assert by_cli == by_job and by_cli[0] == EXIT_BAD_INPUT and by_cli[1][0].startswith("error: ")


SLEEPER = """
import sys, time
from mysproj import process
def body():
    print("working", flush=True)
    time.sleep(120)
sys.exit(process.run("sleeper", body))
"""


@pytest.mark.parametrize("as_init", [False, True], ids=["process", "pid-namespace-init"])
def test_sigterm_stops_the_work_with_exit_143_and_a_record(as_init, tmp_path):
    """A pod deleted while its stage runs: the kubelet's SIGTERM stops the work at once (143, retryable) with one
    line and a failure record, also where the process is its PID namespace's init, as a container's first
    process is (the kernel gives init no signal it has no handler for)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-c", SLEEPER]
    if as_init:
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("a PID namespace needs root and unshare")
        argv = ["unshare", "--pid", "--fork", "--kill-child", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "MYSPROJ_OUT": str(out), "RANK": "0", "NODE_RANK": "0"})
    try:
        assert proc.stdout.readline() == "working\n"
        target = proc.pid
        if as_init:  # unshare's child: PID 1 of the new namespace
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            target = int(children[0])
            status = dict(line.split(":", 1) for line in Path(f"/proc/{target}/status").read_text().splitlines())
            assert status["NSpid"].split()[-1] == "1", status["NSpid"]  # its pid in its own namespace
        os.kill(target, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, err
    assert err.splitlines()[-1].startswith("stopped: SIGTERM received (a pod deleted or a node drained); sleeper "), err
    record = json.loads((out / process.FAILURE_RECORD).read_text())
    assert record["exit_code"] == EXIT_PREEMPTED and record["error"].startswith("stopped: SIGTERM received"), record


def test_run_handles_sigterm_only_while_it_runs_and_only_where_nothing_else_does():
    import signal

    def handler_inside():
        seen.append(signal.getsignal(signal.SIGTERM))

    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        seen: list = []
        assert process.run("noop", handler_inside) == 0
        assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN) and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, own)  # a caller's own handler (the local runner's) is left alone
        assert process.run("noop", handler_inside) == 0
        assert seen[1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
