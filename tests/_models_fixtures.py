"""Shared inputs for the models/finetune/merge tests, built once per session: a tiny random LLaVA (HF layout and
original layout), a textures-mini prep output, and helpers to read weights."""

from __future__ import annotations

import contextlib
import os

import pytest

_BUILT: dict[str, str] = {}


def _root(tmp_path_factory) -> str:
    if "root" not in _BUILT:
        _BUILT["root"] = str(tmp_path_factory.mktemp("models-inputs"))
    return _BUILT["root"]


def stage(stage_name: str, **fields):
    from mysproj.config.fields import load_config
    from mysproj.stages.registry import STAGES, run

    return run(stage_name, load_config(STAGES[stage_name][0], overrides=fields))


def weights(folder: str) -> dict:
    from mysproj.models.loading import read_weights

    return read_weights(folder, folder)


@pytest.fixture
def tiny_model(tmp_path_factory) -> str:
    if "tiny" not in _BUILT:
        out = os.path.join(_root(tmp_path_factory), "tiny")
        stage("model-init", preset="tiny", out=out)
        _BUILT["tiny"] = out
    return _BUILT["tiny"]


@pytest.fixture
def tiny_original(tmp_path_factory, tiny_model) -> str:
    """The tiny model written in the original LLaVA layout (LLaVA folder + `vision_tower/` CLIP folder)."""
    if "original" not in _BUILT:
        from mysproj.models.loading import load_llava, write_original

        loaded = load_llava(tiny_model)
        out = os.path.join(_root(tmp_path_factory), "tiny-original")
        write_original(loaded.model.state_dict(), loaded.model.config, loaded.tokenizer, loaded.image_processor, out)
        _BUILT["original"] = out
    return _BUILT["original"]


@pytest.fixture
def prep(tmp_path_factory) -> str:
    if "prep" not in _BUILT:
        out = os.path.join(_root(tmp_path_factory), "prep")
        stage("prep", dataset="textures-mini", out=out, max_per_class=6, workers=1)
        _BUILT["prep"] = out
    return _BUILT["prep"]


@pytest.fixture
def deepspeed_one_process(monkeypatch):
    """DeepSpeed's CPU accelerator in this process: it needs a (1-process) process group. Afterwards the group and
    DeepSpeed's cached clone of it are gone, so a later test starts cleanly."""
    pytest.importorskip("deepspeed")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29513")):
        monkeypatch.setenv(k, v)
    yield
    import torch
    from deepspeed.utils import groups

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None


def finetune(tiny_model: str, prep: str, out: str, **fields) -> dict:
    base = dict(model=tiny_model, data=prep, out=out, global_batch=8, per_device_batch=4, workers=0,
                log_every=1, checkpoint_every=100, lora_r=4, lora_alpha=8)
    base.update(fields)
    return stage("finetune", **base)


@contextlib.contextmanager
def kill_after_checkpoint(monkeypatch, step: int, before_kill=None):
    """While active, a fine-tuning run raises KeyboardInterrupt (a kill) right after checkpoint `step` is saved;
    `before_kill(folder_of_step)` may first damage what was written. Saving is restored on exit."""
    from mysproj.training import checkpoint

    real_save = checkpoint.save

    def save_then_die(ctx, s, state):
        real_save(ctx, s, state)
        if s == step:
            if before_kill:
                before_kill(s)
            raise KeyboardInterrupt(f"simulated kill after checkpoint step {step}")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(checkpoint, "save", real_save)
