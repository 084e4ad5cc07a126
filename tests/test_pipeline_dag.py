import pytest

from mysproj.config.fields import ConfigError, config_hash, load_config
from mysproj.pipeline import dag
from mysproj.stages.registry import STAGES, stage_config


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


def test_a_dataset_without_source_or_origin_is_rejected():
    with pytest.raises(ConfigError, match="sources"):
        _cfg(datasets=["imagefolder"])
    with pytest.raises(ConfigError, match="strategies"):
        _cfg(strategies=["everything"])


def _configs(nodes, stage, strategy=None):
    return [stage_config(n.stage, n.config) for n in nodes
            if n.stage == stage and n.config.get("strategy", strategy) == strategy]


def test_the_released_recipe_sets_every_choice_at_once():
    from mysproj.config.recipes import CHOICES

    strategies = ["projector", "full"]
    paper = dag.build(_cfg(root="/r", strategies=strategies))
    released = dag.build(_cfg(root="/r", strategies=strategies, recipe="released", eval_mode="scoring"))
    for choice in CHOICES:
        strategy = choice.strategy or ("projector" if choice.stage == "finetune" else None)
        for nodes, recipe in ((paper, "paper"), (released, "released")):
            configs = _configs(nodes, choice.stage, strategy)
            assert configs, (choice.stage, strategy)
            want = choice.value(recipe)
            if choice.field == "mode":
                want = "generate" if recipe == "paper" else "scoring"  # the pipeline's eval_mode decides
            assert {getattr(c, choice.field) for c in configs} == {want}, (choice.label, recipe)
    full = _configs(released, "finetune", "full")
    assert {(c.conv, c.image_aspect_ratio) for c in full} == {("v1", "pad")}  # finetune_task.sh's, as in paper


def test_the_paper_recipe_is_the_defaults_and_overrides_beat_the_recipe():
    from mysproj.config.fields import config_hash

    for n in dag.build(_cfg(root="/r")):
        cls = STAGES[n.stage].config
        structural = {k: v for k, v in n.config.items() if k not in dag.recipes.stage_fields(
            "paper", n.stage, n.config.get("strategy"))}
        assert config_hash(stage_config(n.stage, n.config)) == config_hash(
            load_config(cls, overrides=structural, env={}))
    nodes = dag.build(_cfg(root="/r", recipe="released", overrides={"prep": {"label_underscores": "space"},
                                                                   "finetune": {"conv": "v1"}}))
    assert {c.label_underscores for c in _configs(nodes, "prep")} == {"space"}
    assert {c.conv for c in _configs(nodes, "finetune", "projector")} == {"v1"}
    assert {c.image_aspect_ratio for c in _configs(nodes, "finetune", "projector")} == {"square"}
    with pytest.raises(ConfigError, match="recipe"):
        _cfg(recipe="whatever")


def test_tracking_reaches_the_stages_that_log_and_rejects_unknown_settings():
    on = dag.build(_cfg())
    off = dag.build(_cfg(tracking={"tensorboard": False}))
    tracked = {n.stage for n in off if STAGES[n.stage].tracked}
    assert tracked == {"finetune", "eval-clip", "eval-llava", "probe"}
    for a, b in zip(on, off):
        if STAGES[a.stage].tracked:
            assert stage_config(a.stage, a.config).tensorboard is True
            assert stage_config(b.stage, b.config).tensorboard is False
            # an operational switch: the output stays complete whichever way it is set
            assert config_hash(stage_config(a.stage, a.config)) == config_hash(stage_config(b.stage, b.config))
        else:
            assert "tensorboard" not in b.config
    with pytest.raises(ConfigError, match="tracking.*mlflow"):
        _cfg(tracking={"mlflow": "http://x"}).check()
    with pytest.raises(ConfigError, match="tracking.tensorboard"):
        _cfg(tracking={"tensorboard": "yes"}).check()
    with pytest.raises(ConfigError, match="holds credentials") as e:
        _cfg(tracking={"mlflow_uri": "http://user:s3cret@mlflow:5000"}).check()
    assert "s3cret" not in str(e.value)
    mlflow = dag.build(_cfg(tracking={"mlflow_uri": "http://mlflow:5000"}))
    assert {n.stage for n in mlflow if n.config.get("mlflow_uri") == "http://mlflow:5000"} == {
        "finetune", "eval-clip", "eval-llava", "probe", "report"}
