"""Shared inputs for the eval/probe/report tests: a small textures-mini prep output and tiny random models,
built once per test session (memoised here, since fixtures imported into several modules are not shared)."""

from __future__ import annotations

import os

import pytest
from _models_fixtures import stage

_BUILT: dict[str, str] = {}


def _root(tmp_path_factory) -> str:
    if "root" not in _BUILT:
        _BUILT["root"] = str(tmp_path_factory.mktemp("eval-inputs"))
    return _BUILT["root"]


# One way to run a stage in-process from tests: the models fixtures' helper.
run_stage_cfg = stage


@pytest.fixture
def prep_uri(tmp_path_factory) -> str:
    if "prep" not in _BUILT:
        out = os.path.join(_root(tmp_path_factory), "textures-mini", "prep")
        run_stage_cfg("prep", dataset="textures-mini", out=out, max_per_class=4, workers=1)
        _BUILT["prep"] = out
    return _BUILT["prep"]


@pytest.fixture
def clip_tiny_uri(tmp_path_factory) -> str:
    if "clip" not in _BUILT:
        out = os.path.join(_root(tmp_path_factory), "models", "clip-tiny")
        run_stage_cfg("model-init", preset="clip-tiny", out=out)
        _BUILT["clip"] = out
    return _BUILT["clip"]


@pytest.fixture
def llava_tiny_uri(tmp_path_factory) -> str:
    if "llava" not in _BUILT:
        out = os.path.join(_root(tmp_path_factory), "models", "tiny")
        run_stage_cfg("model-init", preset="tiny", out=out)
        _BUILT["llava"] = out
    return _BUILT["llava"]
