"""The `jobs/` entry points: env -> config -> library call, and the exit-code contract Kubernetes acts on
(0 done, 64 bad input: never retried, anything else retryable), with the failure record the controller shows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mysproj.errors import EXIT_BAD_INPUT, BadInput
from mysproj.kube import entry

REPO = Path(__file__).resolve().parents[1]


def _load_finetune_entry():
    spec = importlib.util.spec_from_file_location("jobs_finetune", REPO / "jobs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    assert entry.run_job("prep", bad) == EXIT_BAD_INPUT
    assert _record(job_env) == {**_record(job_env), "exit_code": 64, "error": "source s3://x: no such folder",
                                "job": "r1-prep-abc"}
    assert entry.run_job("prep", crash) == entry.EXIT_RETRYABLE
    assert _record(job_env)["exit_code"] == 1 and "connection reset" in _record(job_env)["error"]
    assert entry.run_job("prep", lambda: {"stage": "prep"}) == 0
    assert _record(job_env) is None  # a stale reason never outlives a successful attempt


def test_only_rank_zero_writes_the_record(job_env, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert entry.run_job("finetune", lambda: (_ for _ in ()).throw(BadInput("x"))) == EXIT_BAD_INPUT
    assert _record(job_env) is None


def test_scratch_folders_are_created(tmp_path):
    env = {"MYSPROJ_SCRATCH": str(tmp_path), "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "MPLCONFIGDIR": str(tmp_path / "cache" / "mpl")}
    entry.prepare_scratch(env)
    assert all(Path(env[k]).is_dir() for k in ("HOME", "TMPDIR", "MPLCONFIGDIR"))


def test_stage_entry_point_reads_its_config_from_env(tmp_path):
    """A real process, as the Job runs it: a config error is bad input (exit 64), named in one line."""
    env = {**os.environ, "MYSPROJ_DATASET": "dtd", "MYSPROJ_OUT": str(tmp_path / "prep")}
    env.pop("MYSPROJ_SOURCE", None)
    result = subprocess.run([sys.executable, "-u", "jobs/prep.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "error: config field 'source' is required" in result.stderr
    assert "source" in _record(tmp_path / "prep")["error"]


def test_finetune_launch_layouts():
    ft = _load_finetune_entry()
    assert ft.torchrun_argv({"MYSPROJ_NPROC_PER_NODE": "1"}) is None
    assert ft.torchrun_argv({"MYSPROJ_NPROC_PER_NODE": "4", "LOCAL_RANK": "0"}) is None  # already a worker
    one_node = ft.torchrun_argv({"MYSPROJ_NPROC_PER_NODE": "4"})
    assert one_node[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                            str(REPO / "jobs" / "finetune.py")]
    multi = ft.torchrun_argv({"MYSPROJ_NPROC_PER_NODE": "2", "NNODES": "3", "NODE_RANK": "2",
                              "MASTER_ADDR": "r-ft-r0.r-mysproj-ft", "MASTER_PORT": "29501"})
    assert multi[3:-1] == ["--nproc-per-node", "2", "--nnodes", "3", "--node-rank", "2", "--master-addr",
                           "r-ft-r0.r-mysproj-ft", "--master-port", "29501"]
    assert ft.wait_for_dns("localhost", 0) is True
    assert ft.wait_for_dns("no-such-host.invalid", 0) is False


def test_controller_entry_point_rejects_a_missing_config():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYSPROJ_")}
    result = subprocess.run([sys.executable, "-u", "jobs/controller.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT and "MYSPROJ_RELEASE" in result.stderr, result.stderr
