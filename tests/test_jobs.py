"""The `jobs/` entry points (`jobs/stage.py <stage>` for every stage, `jobs/controller.py`): env -> config ->
library call, and the exit-code contract Kubernetes acts on (0 done, 64 bad input: never retried, anything else
retryable), with the failure record the controller shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mysproj import process
from mysproj.errors import EXIT_BAD_INPUT, BadInput
from mysproj.kube import entry

REPO = Path(__file__).resolve().parents[1]


STAGE = REPO / "jobs" / "stage.py"


def _record(out: Path) -> dict | None:
    path = out / "_FAILURE.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("MYSPROJ_OUT", str(out))
    monkeypatch.setenv("MYSPROJ_JOB_NAME", "r1-prep-abc")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    return out


def test_exit_codes_and_failure_record(job_env):
    def bad():
        raise BadInput("source s3://x: no such folder")

    def crash():
        raise RuntimeError("connection reset")

    assert process.run_stage("prep", bad) == EXIT_BAD_INPUT
    assert _record(job_env) == {**_record(job_env), "exit_code": 64, "error": "source s3://x: no such folder",
                                "job": "r1-prep-abc"}
    assert process.run_stage("prep", crash) == process.EXIT_RETRYABLE
    assert _record(job_env)["exit_code"] == 1 and "connection reset" in _record(job_env)["error"]
    assert process.run_stage("prep", lambda: {"stage": "prep"}) == 0
    assert _record(job_env) is None  # a stale reason never outlives a successful attempt


def test_only_rank_zero_writes_the_record(job_env, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert process.run_stage("finetune", lambda: (_ for _ in ()).throw(BadInput("x"))) == EXIT_BAD_INPUT
    assert _record(job_env) is None


def test_scratch_folders_are_created(tmp_path):
    env = {"MYSPROJ_SCRATCH": str(tmp_path), "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "MPLCONFIGDIR": str(tmp_path / "cache" / "mpl")}
    process.prepare_scratch(env)
    assert all(Path(env[k]).is_dir() for k in ("HOME", "TMPDIR", "MPLCONFIGDIR"))


def test_stage_entry_point_reads_its_config_from_env(tmp_path):
    """A real process, as the Job runs it: a config error is bad input (exit 64), named in one line."""
    env = {**os.environ, "MYSPROJ_DATASET": "dtd", "MYSPROJ_OUT": str(tmp_path / "prep")}
    env.pop("MYSPROJ_SOURCE", None)
    result = subprocess.run([sys.executable, "-u", "jobs/stage.py", "prep"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "error: config field 'source' is required" in result.stderr
    assert "source" in _record(tmp_path / "prep")["error"]


def test_stage_entry_point_runs_a_stage_of_the_registry(tmp_path):
    """The one entry point dispatches on the stage name: a whole (small) prep, and a stage it does not know."""
    out = tmp_path / "prep"
    env = {**os.environ, "MYSPROJ_DATASET": "textures-mini", "MYSPROJ_OUT": str(out), "MYSPROJ_MAX_PER_CLASS": "2",
           "MYSPROJ_PATCH_SIZE": "32"}
    result = subprocess.run([sys.executable, "-u", "jobs/stage.py", "prep"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "_SUCCESS.json").exists() and json.loads((out / "_SUCCESS.json").read_text())["stage"] == "prep"
    for argv in (["no-such-stage"], [], ["prep", "extra"]):
        bad = subprocess.run([sys.executable, "-u", "jobs/stage.py", *argv], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == EXIT_BAD_INPUT, bad.stderr
        assert bad.stderr.startswith("error: usage: stage.py STAGE, one of fetch, prep, model-init, finetune"), \
        bad.stderr


def test_finetune_launch_layouts():
    script = str(STAGE)
    assert entry.torchrun_argv(script, {"MYSPROJ_NPROC_PER_NODE": "1"}) is None
    assert entry.torchrun_argv(script, {"MYSPROJ_NPROC_PER_NODE": "4", "LOCAL_RANK": "0"}) is None  # a worker
    one_node = entry.torchrun_argv(script, {"MYSPROJ_NPROC_PER_NODE": "4"})
    assert one_node[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone", script,
                            "finetune"]
    multi = entry.torchrun_argv(script, {"MYSPROJ_NPROC_PER_NODE": "2", "NNODES": "3", "NODE_RANK": "2",
                                         "MASTER_ADDR": "r-ft-r0.r-mysproj-ft", "MASTER_PORT": "29501"})
    assert multi[3:-2] == ["--nproc-per-node", "2", "--nnodes", "3", "--node-rank", "2", "--master-addr",
                           "r-ft-r0.r-mysproj-ft", "--master-port", "29501"]
    assert entry.wait_for_dns("localhost", 0) is True
    assert entry.wait_for_dns("no-such-host.invalid", 0) is False


def test_python_dash_m_mysproj_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "mysproj", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mysproj")
    for command in ("prep", "model", "run", "status", "logs", "reproduce", "bench", "ask"):
        assert command in result.stdout, command


def test_a_missing_command_module_fails_loudly():
    """The command modules are plain imports of mysproj.cli: one that is gone is an ImportError, not a quietly
    missing command."""
    code = ("import sys, importlib.abc\n"
            "class Gone(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mysproj.commands.ask':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Gone())\n"
            "import mysproj.cli\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "ImportError" in result.stderr and "'ask'" in result.stderr, result.stderr


def test_controller_entry_point_rejects_a_missing_config():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSPROJ_")}
    result = subprocess.run([sys.executable, "-u", "jobs/controller.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT and "MYSPROJ_RELEASE" in result.stderr, result.stderr


def test_a_missing_module_or_a_read_only_root_is_final_with_one_line(job_env, capsys):
    """What no retry can fix in a container: the image lacks a module the stage imports, or the stage writes to the
    read-only root file system. Exit 64 (never retried), one `error:` line naming the cause, the record for status."""
    def lacks_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    def read_only():
        raise OSError(30, "Read-only file system", "/app/cache")

    assert process.run_stage("eval-clip", lacks_torch) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: stage eval-clip: this image lacks the Python module 'torch' (No module named 'torch'); run the stage "
        "in an image that has it (the chart's images.gpu for every stage that needs torch)"]
    assert _record(job_env)["exit_code"] == EXIT_BAD_INPUT and "'torch'" in _record(job_env)["error"]
    assert process.run_stage("prep", read_only) == EXIT_BAD_INPUT
    assert "/app/cache is on the read-only root file system" in _record(job_env)["error"]
    assert process.run_stage("prep", lambda: (_ for _ in ()).throw(ConnectionResetError(104, "reset"))) == 1
