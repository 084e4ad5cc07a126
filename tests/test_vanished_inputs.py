"""An input that vanishes while a stage reads it (an image of the prepared data, a model's file): one `error:` line
naming the file and what to do, exit 64 (no retry brings a deleted file back), from the command line, a stage
Job's entry point and both executors of `mysproj run`; never torch's page of a DataLoader worker's traceback."""

from __future__ import annotations

import os

import pytest
from stage_runs import FINETUNE_DEFAULTS, cli, stage

from mysproj.errors import EXIT_BAD_INPUT


@pytest.fixture
def own_prep(tmp_path) -> str:
    """A prep output of this test alone: its samples name images inside it, and the test deletes one."""
    out = str(tmp_path / "prep")
    stage("prep", dataset="textures-mini", out=out, max_per_class=2, workers=1)
    return out


def _delete_an_image(prep: str, split: str = "test") -> str:
    from mysproj.data.prepared import PreparedData

    image = PreparedData(prep).samples(split)[-1].image
    os.remove(image)
    return image


def _one_line_naming(errors: list[str], printed: str, path: str) -> None:
    assert len(errors) == 1, printed
    assert path in errors[0] and "restore it" in errors[0], errors
    assert "Traceback" not in printed and "DataLoader worker" not in printed, printed


def test_eval_image_gone_read_in_a_worker(own_prep, clip_tiny_uri, tmp_path, capsys):
    gone = _delete_an_image(own_prep)
    out = tmp_path / "eval"
    rc, errors, printed = cli(["eval-clip", "--model", clip_tiny_uri, "--data", own_prep, "--out", out,
                               "--workers", "1"], capsys)
    assert rc == EXIT_BAD_INPUT
    _one_line_naming(errors, printed, gone)
    assert not (out / "_SUCCESS.json").exists()


def test_finetune_image_gone_after_it_started(own_prep, tiny_model, tmp_path, capsys, monkeypatch):
    """The image is deleted after fine-tuning has resolved and verified every image, as a run would see a file
    deleted while it trains; the Job's entry point reports it."""
    from mysproj.process import run_stage
    from mysproj.training import loop

    gone = []

    def load_then_delete(*args, **kwargs):
        examples = load_examples(*args, **kwargs)
        gone.append(examples[0].image_path)
        os.remove(gone[0])
        return examples

    load_examples = loop.load_examples
    monkeypatch.setattr(loop, "load_examples", load_then_delete)
    capsys.readouterr()
    rc = run_stage("finetune", lambda: stage("finetune", model=tiny_model, data=own_prep, out=str(tmp_path / "ft"),
                                           **{**FINETUNE_DEFAULTS, "workers": 1, "max_steps": 2}))
    out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT
    _one_line_naming([line for line in err.splitlines() if line.startswith("error:")], out + err, gone[0])
    assert not (tmp_path / "ft" / "_SUCCESS.json").exists()


def test_a_file_gone_under_a_library_is_one_line(own_prep, tmp_path, capsys, monkeypatch):
    """A library's own `open` of a file that is gone (no check of mysproj's in between): the command line and a
    stage Job each print one line naming it, exit 64; the in-process runner counts it as bad input."""
    from mysproj.models import clip
    from mysproj.pipeline import dag
    from mysproj.pipeline.local import InProcess
    from mysproj.process import run_stage
    from mysproj.stages import registry

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text("{}")
    weights = str(tmp_path / "clip" / "open_clip_model.safetensors")
    monkeypatch.setattr(clip, "load_clip", lambda *args, **kwargs: open(weights, "rb"))
    fields = {"model": str(tmp_path / "clip"), "data": own_prep, "out": str(tmp_path / "eval")}
    rc, errors, printed = cli(["eval-clip", *(f"--{k}={v}" for k, v in fields.items())], capsys)
    assert rc == EXIT_BAD_INPUT
    _one_line_naming(errors, printed, weights)
    rc = run_stage("eval-clip", lambda: stage("eval-clip", **fields))
    out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT
    _one_line_naming([line for line in err.splitlines() if line.startswith("error:")], out + err, weights)
    node = dag.Node("textures-mini/eval-clip", "eval-clip", fields)
    here = InProcess(registry.node_configs([node]))
    here.start(node, (0,))
    ended = here.wait()
    assert ended.bad_input and weights in ended.error and "\n" not in ended.error, ended


def test_run_summary_is_one_line(own_prep, clip_tiny_uri, tmp_path):
    """What `mysproj run` prints for the failed stage: one line with the file, from a child process (several
    device slots) and from this process (one), each counted as bad input."""
    from mysproj.pipeline import dag, schedule
    from mysproj.pipeline.local import ChildProcesses, InProcess
    from mysproj.stages import registry

    gone = _delete_an_image(own_prep)
    node = dag.Node("textures-mini/eval-clip", "eval-clip",
                    {"model": clip_tiny_uri, "data": own_prep, "out": str(tmp_path / "eval"), "workers": 1})
    children = ChildProcesses(str(tmp_path / "logs"), schedule.Capacity(2, 2))
    children.start(node, (0,))
    in_child = children.wait()
    children.close()
    here = InProcess(registry.node_configs([node]))
    here.start(node, (0,))
    in_process = here.wait()
    for ended in (in_child, in_process):
        assert not ended.ok and ended.bad_input, ended
        assert gone in ended.error and "restore it" in ended.error and "\n" not in ended.error, ended.error


class _OpensAMissingFile:
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        with open(self.path, "rb") as f:
            return f.read()


def test_a_workers_plain_oserror_keeps_its_file_name(tmp_path):
    """torch hands a worker's FileNotFoundError back as text; it comes back out with its file name, so the line
    for it names the file."""
    from torch.utils.data import DataLoader

    from mysproj.errors import vanished, worker_errors

    missing = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError) as caught:
        list(worker_errors(DataLoader(_OpensAMissingFile(missing), num_workers=1, batch_size=None)))
    assert caught.value.filename == missing
    line = vanished(caught.value)
    assert line.startswith(f"{missing}: no such file") and "\n" not in line
