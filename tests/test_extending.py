"""Adding a dataset or a stage is one record plus its own module: a toy of each (tests/toy_extension.py) is
registered, run through the CLI, the pipeline's checks, the run layout and the report's task order, then taken out
again, after which nothing knows it."""

import json

import pytest
import toy_extension as toy
from dataset_layouts import write_image
from stage_runs import cli

from mysproj import layout
from mysproj.config import datasets, registry
from mysproj.config.fields import ConfigError, load_config
from mysproj.pipeline.dag import Node, PipelineConfig, check_overrides
from mysproj.report.tables import dataset_order
from mysproj.storage.manifest import read_manifest


@pytest.fixture
def registered():
    datasets.register(toy.DATASET)
    registry.register(toy.STAGE)
    try:
        yield
    finally:
        registry.unregister(toy.STAGE.name)
        datasets.unregister(toy.DATASET.name)


def _toy_source(root) -> str:
    seed = 0
    for split, n in (("fit", 3), ("check", 2)):
        for label in ("circle", "square"):
            for i in range(n):
                seed += 1
                write_image(str(root / split / label / f"{i}.jpg"), seed=seed)
    return str(root)


def test_a_toy_dataset_and_stage_are_one_record_each(registered, tmp_path, capsys):
    source = _toy_source(tmp_path / "src")
    prep = tmp_path / "run" / "toy-shapes" / "prep"
    rc, errors, _ = cli(["prep", "--dataset", "toy-shapes", "--source", source, "--out", prep, "--workers", 1],
                        capsys)
    assert (rc, errors) == (0, [])
    classes = json.loads((prep / "classes.json").read_text())
    assert classes["classes"] == ["circle", "square"] and classes["task"] == "simple shapes"

    out = tmp_path / "run" / "toy-shapes" / "zero-shot" / "class-count"
    rc, errors, printed = cli(["class-count", "--data", prep, "--out", out], capsys)
    assert (rc, errors) == (0, []) and "class-count: done" in printed
    summary = registry.summary_of(read_manifest(str(out)))
    assert isinstance(summary, toy.ClassCountSummary)
    assert (summary.classes, summary.task) == (2, "simple shapes") and summary.seconds is not None

    assert layout.parse("toy-shapes/zero-shot/class-count")["stage"] == "class-count"
    assert Node("x", "class-count", {}).gpu is False
    check_overrides({"class-count": {"at_least": 2}})
    with pytest.raises(ConfigError, match="'nope' is not a field of class-count"):
        check_overrides({"class-count": {"nope": 1}})
    cfg = load_config(PipelineConfig, env={}, overrides={"root": str(tmp_path / "r"), "datasets": ["toy-shapes"],
                                                           "sources": {"toy-shapes": source}})
    assert cfg.datasets == ["toy-shapes"]
    assert dataset_order().index("toy-shapes") == dataset_order().index("textures-mini") + 1  # the Textures task


def test_once_taken_out_nothing_knows_them(tmp_path, capsys):
    datasets.register(toy.DATASET)
    registry.register(toy.STAGE)
    with pytest.raises(ValueError, match="registered already"):
        registry.register(toy.STAGE)
    registry.unregister(toy.STAGE.name)
    datasets.unregister(toy.DATASET.name)
    assert layout.parse("toy-shapes/zero-shot/class-count") is None
    assert "toy-shapes" not in dataset_order()
    with pytest.raises(ConfigError, match="'toy-shapes': must be one of"):
        load_config(PipelineConfig, env={}, overrides={"root": str(tmp_path), "datasets": ["toy-shapes"]})
    with pytest.raises(ConfigError, match="'class-count' is not a stage"):
        check_overrides({"class-count": {}})
    with pytest.raises(SystemExit) as stopped:
        cli(["class-count", "--out", tmp_path / "x"], capsys)
    assert stopped.value.code == 64 and "invalid choice: 'class-count'" in capsys.readouterr().err
