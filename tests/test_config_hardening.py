"""Config input that used to give a traceback or a silently wrong run: YAML aliases, non-finite numbers, badly shaped
configs, misspelt overrides, repeated datasets/seeds, a junk MYSPROJ_* setting, other text encodings, `--only` typos,
stage variables `mysproj run` does not apply; and storage failures as one line (no credentials, an unreachable
endpoint with a stated retry budget)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mysproj import cli, process
from mysproj.config.fields import ConfigError, load_config
from mysproj.config.stages import FinetuneConfig, PrepConfig
from mysproj.errors import EXIT_BAD_INPUT, BadInput, StorageError
from mysproj.pipeline import command as run_command
from mysproj.pipeline import dag, local
from mysproj.pipeline.dag import PipelineConfig
from mysproj.storage import uri as U

REPO = Path(__file__).resolve().parents[1]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["xxxxxxxxxxxxxxxx"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nroot: *a8\n")  # ~600 bytes that expand to 9^8 strings
    assert cli.main(["run", "--config", str(bomb), "--plan"]) == EXIT_BAD_INPUT
    line = _one_error(capsys)
    assert str(bomb) in line and "aliases" in line


@pytest.mark.parametrize("field, value", [("lr", "nan"), ("lr", "inf"), ("epochs", "inf"), ("epochs", "-inf"),
                                          ("epochs", "NaN")])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"'{field}' = '{value}': expected a finite number"):
        load_config(FinetuneConfig, cli={field: value, "model": "m", "data": "d", "out": "o"}, env={})


def test_non_finite_numbers_from_yaml_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: d\nout: o\nepochs: .inf\n")
    with pytest.raises(ConfigError, match="'epochs' = inf: expected a finite number"):
        load_config(FinetuneConfig, yaml_file=str(cfg), env={})


@pytest.mark.parametrize("overrides, expected", [
    ({"finetune": 5}, "'overrides.finetune' = 5: expected a mapping"),
    ({"finetun": {"lr": 0.1}}, "'finetun' is not a stage; did you mean 'finetune'?"),
    ({"finetune": {"lrr": 0.1}}, "'lrr' is not a field of finetune; did you mean 'lr'?"),
    ({"finetune": {1: 0.1}}, "1 is not a field of finetune"),
])
def test_overrides_are_checked_with_the_closest_name(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?")):
        load_config(PipelineConfig, overrides={"overrides": overrides}, env={})


def test_a_config_file_with_a_key_that_is_not_text_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: textures-mini\nout: o\n1: 2\n")
    with pytest.raises(ConfigError, match=f"{cfg}: key 1 is not a field name"):
        load_config(PrepConfig, yaml_file=str(cfg), env={})


def test_a_misspelt_config_file_field_names_the_closest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: textures-mini\nout: o\nmax_per_clas: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'max_per_clas' for PrepConfig; did you mean 'max_per_class'"):
        load_config(PrepConfig, yaml_file=str(cfg), env={})


@pytest.mark.parametrize("field, value", [("datasets", ["textures-mini", "textures-mini"]), ("seeds", [0, 1, 0]),
                                          ("strategies", ["full", "full"])])
def test_a_dataset_seed_or_strategy_listed_twice_is_refused(field, value):
    """Twice would give two writers of one output (two processes on one folder under --gpus 2)."""
    with pytest.raises(ConfigError, match=f"'{field}' lists .* twice"):
        load_config(PipelineConfig, overrides={field: value}, env={})


def test_config_file_with_a_bom_is_read_and_other_encodings_are_one_line(tmp_path, capsys):
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffdataset: textures-mini\nout: o\n".encode())
    assert load_config(PrepConfig, yaml_file=str(bom), env={}).dataset == "textures-mini"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("dataset: textures-mini\nout: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(BadInput, match=f"{latin}: the text is not UTF-8: byte 0xe9 .* save it as UTF-8"):
        load_config(PrepConfig, yaml_file=str(latin), env={})
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes("dataset: textures-mini\n".encode("utf-16"))
    assert cli.main(["prep", "--config", str(utf16)]) == EXIT_BAD_INPUT
    assert f"{utf16}: the text is UTF-16" in _one_error(capsys)


def test_a_split_file_with_a_bom_is_read(tmp_path):
    split = tmp_path / "train1.txt"
    split.write_bytes("\ufeffbanded/banded_0001.jpg\n".encode())
    assert U.read_text(str(split)).splitlines() == ["banded/banded_0001.jpg"]


@pytest.mark.parametrize("var, value", [("MYSPROJ_LOG_LEVEL", "LOUD"), ("MYSPROJ_STORAGE_RETRY_SECONDS", "soon"),
                                        ("MYSPROJ_LEASE_SECONDS", "x")])
def test_a_junk_setting_never_breaks_help(var, value):
    r = subprocess.run([sys.executable, "-m", "mysproj", "--help"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, var: value, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0 and "usage: mysproj" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_a_junk_retry_budget_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MYSPROJ_STORAGE_RETRY_SECONDS", "soon")
    assert cli.main(["prep", "--dataset", "textures-mini", "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "MYSPROJ_STORAGE_RETRY_SECONDS='soon': expected a number of seconds" in _one_error(capsys)


def test_a_junk_log_level_is_one_warning(capsys, monkeypatch):
    monkeypatch.setenv("MYSPROJ_LOG_LEVEL", "LOUD")
    process.setup_logging()
    err = capsys.readouterr().err
    assert "MYSPROJ_LOG_LEVEL='LOUD' is not a log level" in err and "Traceback" not in err


def test_only_naming_no_stage_is_refused():
    nodes = dag.build(load_config(PipelineConfig, env={}))
    assert local.select(nodes, ["textures-mini/prep"])
    with pytest.raises(BadInput, match="--only 'texures-mini' names no stage"):
        local.select(nodes, ["texures-mini"])


def _dtd_without_bom(tmp_path) -> list:
    from dataset_layouts import make_dtd
    from prep_helpers import run_prep

    from mysproj.data.prepared import PreparedData

    src = make_dtd(str(tmp_path / "plain-src"), classes=("banded", "blotchy"), per_split=2)
    run_prep(tmp_path / "plain", dataset="dtd", source=src)
    data = PreparedData(str(tmp_path / "plain"))
    return data.samples("train") + data.samples("test")


@pytest.mark.parametrize("plan", [[], ["--plan"]])
def test_run_with_an_only_naming_no_stage_is_one_line_and_runs_nothing(tmp_path, capsys, plan):
    root = tmp_path / "root"
    assert cli.main(["run", "--root", str(root), "--gpus", "1", "--only", "texures-mini", *plan]) == EXIT_BAD_INPUT
    assert "--only 'texures-mini' names no stage of this pipeline; stages: models/tiny, " in _one_error(capsys)
    assert not root.exists()


def test_a_dtd_split_file_with_a_bom_gives_no_invisible_class(tmp_path):
    """The first line of a split file saved with a byte order mark names the class as the others do."""
    from dataset_layouts import make_dtd
    from prep_helpers import run_prep

    src = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy"), per_split=2)
    for split in ("train1.txt", "val1.txt", "test1.txt"):
        labels = Path(src) / "labels" / split
        labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    run_prep(tmp_path / "o", dataset="dtd", source=src)
    from mysproj.data.prepared import PreparedData

    data = PreparedData(str(tmp_path / "o"))
    assert data.classes == ["banded", "blotchy"]
    assert len(data.samples("train")) + len(data.samples("test")) == len(_dtd_without_bom(tmp_path))


def test_a_dtd_split_file_in_latin_1_is_one_line(tmp_path, capsys):
    from dataset_layouts import make_dtd

    src = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy"), per_split=2)
    labels = Path(src) / "labels" / "train1.txt"
    labels.write_bytes(labels.read_bytes() + "banded/caf\u00e9.jpg\n".encode("latin-1"))
    assert cli.main(["prep", "--dataset", "dtd", "--source", src, "--out", str(tmp_path / "o"),
                     "--workers", "1"]) == EXIT_BAD_INPUT
    assert f"{labels}: the text is not UTF-8: byte 0xe9" in _one_error(capsys)
    assert not (tmp_path / "o" / "_SUCCESS.json").exists()


def test_run_warns_about_stage_variables_it_does_not_apply(caplog):
    env = {"MYSPROJ_LR": "0.1", "MYSPROJ_ROOT": "r", "MYSPROJ_MAX_PER_CLASS": "3"}
    with caplog.at_level(logging.WARNING):
        assert run_command.warn_stage_env(env) == ["MYSPROJ_LR", "MYSPROJ_MAX_PER_CLASS"]
    assert "MYSPROJ_LR is set but `mysproj run` does not apply stage variables (ignored)" in caplog.text
    assert "overrides: {finetune: {lr: ...}}" in caplog.text


# --------------------------------------------------------------------------------------------- storage

@pytest.mark.s3
def test_s3_without_credentials_is_one_line(s3_env, tmp_path, monkeypatch, capsys):
    bucket = s3_env.create_bucket("nocreds")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert cli.main(["prep", "--dataset", "textures-mini", "--out", f"{bucket}/o"]) == EXIT_BAD_INPUT
    line = _one_error(capsys)
    assert "no storage credentials found" in line and "AWS_ACCESS_KEY_ID" in line


@pytest.mark.timeout(180)
def test_an_unreachable_endpoint_gives_up_after_the_stated_budget(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("MYSPROJ_STORAGE_RETRY_SECONDS", "1")
    with pytest.raises(StorageError, match=r"still failing after 1 s of retries, the MYSPROJ_STORAGE_RETRY_SECONDS"):
        U.exists("s3://bucket/x")
    assert cli.main(["prep", "--dataset", "textures-mini", "--out", "s3://bucket/o"]) == 1  # retryable
    assert "MYSPROJ_STORAGE_RETRY_SECONDS budget" in _one_error(capsys)


@pytest.mark.parametrize("var, value", [("MYSPROJ_NPROC_PER_NODE", "two"), ("MYSPROJ_DNS_WAIT_SECONDS", "-1"),
                                        ("NNODES", "1.5")])
def test_a_junk_job_setting_is_one_line_naming_it(var, value, monkeypatch, capsys):
    from mysproj.kube import entry

    monkeypatch.setenv(var, value)
    monkeypatch.setenv("MYSPROJ_NPROC_PER_NODE" if var != "MYSPROJ_NPROC_PER_NODE" else var,
                       "2" if var != "MYSPROJ_NPROC_PER_NODE" else value)
    assert entry.main(["finetune"], str(REPO / "jobs" / "stage.py")) == EXIT_BAD_INPUT
    assert f"{var}={value!r}: expected" in _one_error(capsys)


def test_mysproj_run_says_it_does_not_apply_MYSPROJ_LR_where_a_stage_command_does(tmp_path, capsys, monkeypatch):
    """One rule for the environment: a stage command applies MYSPROJ_LR; `mysproj run` applies only the pipeline's
    own variables and names every other one it was given in one warning line (not a silent default)."""
    from mysproj.stages.registry import stage_config

    monkeypatch.setenv("MYSPROJ_LR", "0.5")
    assert stage_config("finetune", {"model": "m", "data": "d", "out": "o"}, env=os.environ).lr == 0.5
    fields = {"model": "m", "data": "d", "out": "o"}
    assert stage_config("finetune", fields).lr != 0.5  # no env given: none read, by either builder
    assert load_config(FinetuneConfig, overrides=fields).lr != 0.5
    assert cli.main(["run", "--root", str(tmp_path / "r"), "--only", "no-such-stage"]) == EXIT_BAD_INPUT
    lines = [line for line in capsys.readouterr().err.splitlines() if "MYSPROJ_LR" in line]
    assert len(lines) == 1 and "`mysproj run` does not apply stage variables (ignored)" in lines[0], lines
