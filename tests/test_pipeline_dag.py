import pytest

from mysproj.config.fields import ConfigError, load_config
from mysproj.pipeline import dag
from mysproj.stages.registry import stage_config


def _cfg(**kw):
    return load_config(dag.PipelineConfig, overrides=kw, env={})


def test_dag_orders_every_node_after_its_dependencies():
    nodes = dag.build(_cfg(root="/r", seeds=[0, 1], strategies=["projector", "full", "lora"]))
    seen = set()
    for n in nodes:
        assert all(d in seen for d in n.deps), (n.name, n.deps)
        seen.add(n.name)
    names = [n.name for n in nodes]
    assert len(names) == len(set(names))
    assert names[-1] == "report"
    report = nodes[-1]
    evals = {n.name for n in nodes if n.stage in ("eval-clip", "eval-llava", "probe")}
    assert set(report.deps) == evals


def test_projector_runs_are_merged_before_evaluation():
    nodes = {n.name: n for n in dag.build(_cfg(root="/r", strategies=["projector", "full"]))}
    ev = nodes["textures-mini/ft-projector/seed0/eval-llava"]
    assert ev.config["model"] == "/r/textures-mini/ft-projector/seed0/merge"
    assert "textures-mini/ft-projector/seed0/merge" in ev.deps
    full = nodes["textures-mini/ft-full/seed0/eval-llava"]
    assert full.config["model"] == "/r/textures-mini/ft-full/seed0/finetune"


def test_outputs_follow_the_layout_and_overrides_apply():
    cfg = _cfg(root="s3://b/p", overrides={"finetune": {"max_steps": 3}})
    for n in dag.build(cfg):
        assert n.config["out"] == f"s3://b/p/{n.name}"
        if n.stage == "finetune":
            assert n.config["max_steps"] == 3
        stage_config(n.stage, n.config)  # every node's config validates


def test_random_weight_presets_become_model_init_nodes():
    nodes = dag.build(_cfg(root="/r"))
    inits = [n for n in nodes if n.stage == "model-init"]
    assert {n.config["preset"] for n in inits} == {"tiny", "clip-tiny"}
    given = dag.build(_cfg(root="/r", base_model="s3://m/llava", clip_model="s3://m/clip"))
    assert not [n for n in given if n.stage == "model-init"]


def test_a_dataset_without_source_is_rejected():
    with pytest.raises(ConfigError, match="sources"):
        _cfg(datasets=["dtd"])
    with pytest.raises(ConfigError, match="strategies"):
        _cfg(strategies=["everything"])
