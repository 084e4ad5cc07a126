"""The paper's experiment as a DAG of stage runs. Both the local runner and the Kubernetes controller walk the
graph this module builds, so the two paths run exactly the same stages with exactly the same configs:

    prep -> eval-clip, eval-llava (zero-shot), probe (original)
    prep -> finetune projector -> merge -> eval-llava, probe
    prep -> finetune full|lora -> eval-llava, probe
    every eval and probe -> report
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mysproj import layout
from mysproj.config import recipes
from mysproj.config.fields import ConfigError, opt
from mysproj.config.stages import DATASETS, STRATEGIES
from mysproj.errors import has_uri_credentials
from mysproj.storage import join

GPU_STAGES = {"finetune", "merge", "eval-clip", "eval-llava", "probe"}
COMPILING_STAGES = ("finetune", "eval-clip", "eval-llava")  # share `<root>/compile-cache` (their compile_cache)
TRACKED_STAGES = ("finetune", "eval-clip", "eval-llava", "probe")  # write TensorBoard event files (`tensorboard`)
MLFLOW_STAGES = (*TRACKED_STAGES, "report")  # log to MLflow where `tracking.mlflow_uri` is set
TRACKING = {"tensorboard": (bool,), "mlflow_uri": (str, type(None)), "mlflow_experiment": (str,),
            "wandb_project": (str, type(None))}


@dataclass(kw_only=True)
class PipelineConfig:
    root: str = opt("./runs/default", help="run root URI: every stage output lives below it")
    datasets: list[str] = opt(help="datasets to run", default_factory=lambda: ["textures-mini"])
    sources: dict = opt(help="dataset -> source URI (JSON mapping); textures-mini needs none",
                        default_factory=dict)
    seeds: list[int] = opt(help="seeds for fine-tuning and probes", default_factory=lambda: [0])
    strategies: list[str] = opt(help="fine-tuning strategies", default_factory=lambda: ["projector", "full"])
    base_model: str | None = opt(None, help="LLaVA-1.5 base model URI; unset = random weights of model_preset")
    model_preset: str = opt("tiny", help="preset written when base_model is unset",
                            choices=("tiny", "llava-1.5-7b"))
    clip_model: str | None = opt(None, help="CLIP weights URI; unset = random weights of clip_preset")
    clip_preset: str = opt("clip-tiny", help="preset written when clip_model is unset",
                           choices=("clip-tiny", "clip-vit-l-14-336"))
    zero_shot: bool = opt(True, help="run the zero-shot evaluations (CLIP and LLaVA)")
    probe: bool = opt(True, help="run the pre/post-projection probes")
    eval_mode: str = opt("generate", help="eval-llava mode", choices=("generate", "scoring"))
    recipe: str = opt("paper", help="where the paper's text and the released scripts disagree, follow: paper (the "
                      "text) or released (FT-Proj trained as pretrain.sh: conversation plain, square images; prompt "
                      "ending '\n\nOutput:'; underscores deleted from labels; the released probe script's protocol; "
                      "CLS pooling before the projector); overrides still set any one field",
                      choices=recipes.RECIPES)
    overrides: dict = opt(help="per-stage config overrides, JSON {stage: {field: value}}", default_factory=dict)
    tracking: dict = opt(help="where a run is watched besides its manifests, JSON {tensorboard: true|false, "
                         "mlflow_uri: URI|null, mlflow_experiment: name, wandb_project: name|null} "
                         "(docs/observability.md)",
                         default_factory=lambda: {"tensorboard": True})

    def check(self) -> None:
        for d in self.datasets:
            if d not in DATASETS:
                raise ConfigError(f"config field 'datasets' = {d!r}: must be one of {', '.join(DATASETS)}")
            if d != "textures-mini" and d not in self.sources:
                raise ConfigError(f"config field 'sources' has no entry for dataset '{d}': add {d}: <URI>")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"config field 'strategies' = {s!r}: must be one of {', '.join(STRATEGIES)}")
        if not self.datasets:
            raise ConfigError("config field 'datasets' is empty")
        if not self.seeds:
            raise ConfigError("config field 'seeds' is empty")
        for key, value in self.tracking.items():
            if key not in TRACKING:
                raise ConfigError(f"config field 'tracking' has no setting {key!r}: use {', '.join(TRACKING)}")
            if not isinstance(value, TRACKING[key]):
                kind = "true or false" if TRACKING[key] == (bool,) else "a string"
                raise ConfigError(f"config field 'tracking.{key}' = {value!r}: must be {kind}")
        if has_uri_credentials(self.tracking.get("mlflow_uri") or ""):
            raise ConfigError("config field 'tracking.mlflow_uri' holds credentials: give them as "
                              "MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD; the chart's trackingSecret) instead")


@dataclass
class Node:
    name: str                  # unique, path-like: also the stage's output path below the root
    stage: str                 # registry stage name
    config: dict               # stage config fields (out included)
    deps: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.stage in GPU_STAGES or (self.stage == "model-init" and self.config.get("preset") in
                                            ("llava-1.5-7b",))


def build(cfg: PipelineConfig) -> list[Node]:
    """Nodes in a valid execution order (every node after its dependencies)."""
    root = cfg.root.rstrip("/")
    nodes: list[Node] = []

    def add(name: str, stage: str, config: dict, deps: list[str]) -> str:
        if stage in COMPILING_STAGES:
            config = {**config, "compile_cache": join(root, "compile-cache")}
        if stage in TRACKED_STAGES:
            config = {**config, "tensorboard": cfg.tracking.get("tensorboard", True)}
            if cfg.tracking.get("wandb_project"):
                config = {**config, "wandb_project": cfg.tracking["wandb_project"]}
        if stage in MLFLOW_STAGES and cfg.tracking.get("mlflow_uri"):
            config = {**config, "mlflow_uri": cfg.tracking["mlflow_uri"],
                      "mlflow_experiment": cfg.tracking.get("mlflow_experiment") or "mysproj"}
        # the recipe's choices, then what this node is (models, data, seed, the eval mode), then the overrides
        merged = {**recipes.stage_fields(cfg.recipe, stage, config.get("strategy")), **config,
                  **cfg.overrides.get(stage, {})}
        merged["out"] = join(root, name)
        nodes.append(Node(name, stage, merged, deps))
        return name

    model_deps: list[str] = []
    base_model = cfg.base_model
    if base_model is None:
        model_deps = [add(f"models/{cfg.model_preset}", "model-init", {"preset": cfg.model_preset}, [])]
        base_model = join(root, model_deps[0])
    clip_deps: list[str] = []
    clip_model = cfg.clip_model
    if clip_model is None and cfg.zero_shot:
        clip_deps = [add(f"models/{cfg.clip_preset}", "model-init", {"preset": cfg.clip_preset}, [])]
        clip_model = join(root, clip_deps[0])

    finals: list[str] = []
    for ds in cfg.datasets:
        prep_cfg = {"dataset": ds}
        if ds in cfg.sources:
            prep_cfg["source"] = cfg.sources[ds]
        prep = add(f"{ds}/prep", "prep", prep_cfg, [])
        data = join(root, prep)

        def rel(stage, setting=None, seed=None, _ds=ds):
            return layout.stage_uri("", _ds, stage, setting, seed).lstrip("/")

        if cfg.zero_shot:
            finals.append(add(rel("eval-clip", layout.ZERO_SHOT), "eval-clip",
                              {"model": clip_model, "data": data}, [prep, *clip_deps]))
            finals.append(add(rel("eval-llava", layout.ZERO_SHOT), "eval-llava",
                              {"model": base_model, "data": data, "mode": cfg.eval_mode}, [prep, *model_deps]))
        for seed in cfg.seeds:
            if cfg.probe:
                finals.append(add(rel("probe", layout.ZERO_SHOT, seed), "probe",
                                  {"model": base_model, "data": data, "seed": seed}, [prep, *model_deps]))
            for strategy in cfg.strategies:
                setting = layout.setting_for(strategy)
                ft = add(rel("finetune", setting, seed), "finetune",
                         {"model": base_model, "data": data, "strategy": strategy, "seed": seed},
                         [prep, *model_deps])
                tuned, tuned_dep = join(root, ft), ft
                if strategy == "projector":
                    tuned_dep = add(rel("merge", setting, seed), "merge",
                                    {"base": base_model, "projector": join(root, ft)}, [ft, *model_deps])
                    tuned = join(root, tuned_dep)
                finals.append(add(rel("eval-llava", setting, seed), "eval-llava",
                                  {"model": tuned, "data": data, "mode": cfg.eval_mode}, [prep, tuned_dep]))
                if cfg.probe:
                    finals.append(add(rel("probe", setting, seed), "probe",
                                      {"model": tuned, "data": data, "seed": seed}, [prep, tuned_dep]))
    add("report", "report", {"runs": [root]}, finals)
    return nodes
