"""Never write into an input, outside the run or at `/`; failed writes leave no temporary file; a full disk is one
line; inputs count by content, not by how their path is spelt (a moved run root re-runs nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline_local import OVERRIDES

from mysproj import cli
from mysproj.config.fields import ConfigError, load_config
from mysproj.config.stages import PrepConfig
from mysproj.errors import EXIT_BAD_INPUT, BadInput, StorageError
from mysproj.pipeline.dag import PipelineConfig
from mysproj.storage import manifest as M
from mysproj.storage import uri as U

REPO = Path(__file__).resolve().parents[1]


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _model(folder: Path) -> Path:
    """A downloaded model: no manifest."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"the user's weights")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("argv, field", [
    (["merge", "--base", "{m}", "--projector", "{p}", "--out", "{m}"], "its input 'base'"),
    (["merge", "--base", "{m}/", "--projector", "{p}", "--out", "file://{m}"], "its input 'base'"),
    (["finetune", "--strategy", "full", "--model", "{m}", "--data", "{p}", "--out", "{m}"], "its input 'model'"),
    (["finetune", "--strategy", "full", "--model", "{m}", "--data", "{p}", "--out", "{m}/ft"],
     "inside its input 'model'"),
    (["prep", "--dataset", "dtd", "--source", "{m}", "--out", "{m}/.."], "input 'source' ("),
])
def test_an_output_overlapping_an_input_is_refused_and_the_input_is_untouched(tmp_path, capsys, argv, field):
    m = _model(tmp_path / "M")
    p = tmp_path / "ft" / "projector.safetensors"
    argv = [a.format(m=m, p=p) for a in argv]
    assert cli.main(argv) == EXIT_BAD_INPUT
    errors = _errors(capsys)
    assert len(errors) == 1 and field in errors[0] and "pick another --out" in errors[0], errors
    assert (m / "model.safetensors").read_bytes() == b"the user's weights"
    assert sorted(os.listdir(m)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("out", ["", "  ", "/", "file:///"])
def test_an_empty_or_root_output_is_refused(tmp_path, out):
    cfg = load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": str(tmp_path / "o")}, env={})
    cfg.out = out
    with pytest.raises(BadInput, match="is empty|file system root"):
        M.run_stage("prep", cfg, lambda o: pytest.fail("wrote something"))


@pytest.mark.parametrize("root", ["", "/"])
def test_an_empty_or_root_run_root_is_refused(root):
    with pytest.raises(ConfigError, match="config field 'root' .*unset MYSPROJ_ROOT"):
        load_config(PipelineConfig, env={"MYSPROJ_ROOT": root})


def test_a_home_relative_path_is_expanded():
    assert U.local_path("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_an_out_under_home_is_written_there(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prep", "--dataset", "textures-mini", "--out", "~/p", "--max-per-class", "2",
                     "--workers", "1"]) == 0
    assert M.StageInput(str(tmp_path / "home" / "p"), "prep").files
    assert not (tmp_path / "~").exists()


def test_copying_a_file_again_leaves_no_temporary_link(tmp_path):
    src, dst = tmp_path / "a" / "f", tmp_path / "b" / "f"
    src.parent.mkdir()
    src.write_bytes(b"x")
    for _ in range(2):  # the second time the target is already a link to the same file: rename does nothing
        assert U.copy(str(src), str(dst)) == "link"
    assert sorted(os.listdir(dst.parent)) == ["f"]


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
{body}
"""


def _full_disk(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FULL_DISK.format(body=body)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_a_write_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "o" / "big.bin"
    r = _full_disk(f"""
from mysproj.errors import StorageError
from mysproj.storage import uri
try:
    uri.write_bytes({str(target)!r}, bytes(100000))
except StorageError as e:
    print("StorageError:", e)
""")
    assert "StorageError: writing" in r.stdout and "no space left" in r.stdout, r.stdout + r.stderr
    assert os.listdir(target.parent) == []


def test_a_stage_on_a_full_disk_exits_retryable_with_one_line_and_nothing_complete(tmp_path):
    out = tmp_path / "prep"
    r = _full_disk(f"""
from mysproj.cli import main
sys.exit(main(["prep", "--dataset", "textures-mini", "--out", {str(out)!r}, "--max-per-class", "4",
               "--workers", "1"]))
""")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "no space left" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    left = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert M.MANIFEST not in left and not [p for p in left if ".tmp-" in p or ".staging-" in p], left


def test_storage_error_is_retryable_not_bad_input():
    assert not issubclass(StorageError, BadInput)


# ------------------------------------------------------------------------------- inputs keyed by content

def test_an_input_spelt_another_way_reruns_nothing(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("data")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "o")
    ran = []

    def body(o):
        ran.append(1)
        o.write_text("x.txt", "1")

    spellings = [str(raw), "raw", "./raw/", f"file://{raw}", f"file://{raw}/", "~/../" + os.path.relpath(
        raw, os.path.dirname(os.path.expanduser("~")))]
    for source in spellings:
        cfg = load_config(PrepConfig, overrides={"dataset": "dtd", "source": source, "out": out}, env={})
        M.run_stage("prep", cfg, body)
    assert ran == [1]
    assert M.read_manifest(out)["config"]["source"] == str(raw)  # where the input was, as the writer had it
    (raw / "a.txt").write_text("other data")
    M.run_stage("prep", load_config(PrepConfig, overrides={"dataset": "dtd", "source": "raw", "out": out}, env={}),
                body)
    assert ran == [1, 1]  # content still counts


def _run(root: Path, capsys) -> str:
    assert cli.main(["run", "--root", str(root), "--gpus", "1", "--strategies", "projector", "--no-zero-shot",
                     "--no-probe", "--overrides", json.dumps(OVERRIDES)]) == 0
    return capsys.readouterr().out


@pytest.mark.timeout(600)
def test_a_moved_run_root_reruns_nothing(tmp_path, capsys):
    first = _run(tmp_path / "a", capsys)
    assert "6 done" in first, first
    os.rename(tmp_path / "a", tmp_path / "b")
    again = _run(tmp_path / "b", capsys)
    assert "pipeline: 6 stages" in again and "6 skipped" in again, again
