"""The paper's experiment as a DAG of stage runs. Both the local runner and the Kubernetes controller walk the
graph this module builds, so the two paths run exactly the same stages with exactly the same configs:

    fetch (each remote origin: a dataset's archives, a model) -> the stages that read it
    prep -> eval-clip, eval-llava (zero-shot), probe (original)
    prep -> finetune projector -> merge -> eval-llava, probe
    prep -> finetune full|lora -> eval-llava, probe
    every eval and probe -> report
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mysproj import layout
from mysproj.config import recipes
from mysproj.config.datasets import RECORDS
from mysproj.config.fields import ConfigError, closest, opt
from mysproj.config.registry import STAGES
from mysproj.config.stages import CLIP_ORIGIN, STRATEGIES
from mysproj.errors import has_uri_credentials
from mysproj.sources import is_remote
from mysproj.sources.fetched import output_uri
from mysproj.storage import join

TRACKING = {"tensorboard": (bool,), "mlflow_uri": (str, type(None)), "mlflow_experiment": (str,),
            "wandb_project": (str, type(None))}


@dataclass(kw_only=True)
class PipelineConfig:
    root: str = opt("./runs/default", help="run root URI: every stage output lives below it")
    datasets: list[str] = opt(help="datasets to run", default_factory=lambda: ["textures-mini"])
    sources: dict = opt(help="dataset -> source: a path or storage URI, an origin URI or a list of origins (JSON "
                        "mapping); a dataset left out is fetched from its published origin (docs/stage-in.md)",
                        default_factory=dict)
    cache: str = opt("", help="URI below which fetched origins are kept, shared by every run that names it (one "
                     "download per bucket); empty = 'cache' beside the run root")
    accept_terms: list[str] = opt(help="datasets whose publisher's terms you have read and accept (crisismmd): "
                                  "only these are fetched from an origin that requires it", default_factory=list)
    vision_tower: str = opt(CLIP_ORIGIN, help="the CLIP tower a base_model origin in the original LLaVA layout is "
                            "completed with (its config's mm_vision_tower)")
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
                      "eval-llava sampled at temperature 0.2 with up to 512 new tokens, as cli.py; the PIL image "
                      "processor; the released batch and data order details); overrides still set any one field",
                      choices=recipes.RECIPES)
    overrides: dict = opt(help="per-stage config overrides, JSON {stage: {field: value}}", default_factory=dict)
    tracking: dict = opt(help="where a run is watched besides its manifests, JSON {tensorboard: true|false, "
                         "mlflow_uri: URI|null, mlflow_experiment: name, wandb_project: name|null} "
                         "(docs/observability.md)",
                         default_factory=lambda: {"tensorboard": True})

    def check(self) -> None:
        for d in self.datasets:
            if d not in RECORDS:
                raise ConfigError(f"config field 'datasets' = {d!r}: must be one of {', '.join(RECORDS)}")
            record = RECORDS[d]
            if d in self.sources:
                parts = self.source_list(d)
                if len(parts) > 1 and not all(is_remote(p) for p in parts):
                    raise ConfigError(f"config field 'sources' for '{d}': a list must hold origin URIs only "
                                      f"(https://, github://, hf://, kaggle://)")
            elif not record.embedded and not record.origin:
                raise ConfigError(f"config field 'sources' has no entry for dataset '{d}': add {d}: <URI>")
            elif record.terms and d not in self.accept_terms:
                raise ConfigError(f"dataset '{d}' is published on terms you must accept first ({record.terms}): "
                                  f"read them, then add {d} to accept_terms (Helm: pipeline.accept_terms), or "
                                  f"name your own copy in sources")
        for d in self.accept_terms:
            if d not in RECORDS:
                raise ConfigError(f"config field 'accept_terms' = {d!r}: must be one of {', '.join(RECORDS)}")
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
        for name in ("datasets", "seeds", "strategies"):  # a repeat would give two writers of one output
            values = getattr(self, name)
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise ConfigError(f"config field '{name}' lists {twice!r} twice; list each once")
        if not self.root.strip() or self.root.strip() in ("/", "file:///"):
            raise ConfigError(f"config field 'root' = {self.root!r}: an empty root or '/' would write at the top of "
                              f"the file system (an unset MYSPROJ_ROOT?); pass --root FOLDER")
        check_overrides(self.overrides)

    def source_list(self, dataset: str) -> list[str]:
        """The dataset's source as a list of URIs: what `sources` names, else its published origin."""
        given = self.sources.get(dataset)
        if given is None:
            return list(RECORDS[dataset].origin)
        return [str(u) for u in given] if isinstance(given, list) else [str(given)]


def check_overrides(overrides: dict) -> None:
    """Every `overrides` key a stage, every value a mapping of that stage's fields: a misspelt one would be
    ignored."""

    for stage, fields in overrides.items():
        if stage not in STAGES:
            raise ConfigError(f"config field 'overrides': {stage!r} is not a stage{closest(stage, STAGES)}; "
                              f"stages: {', '.join(STAGES)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"config field 'overrides.{stage}' = {fields!r}: expected a mapping of field: value")
        names = {f.name for f in dataclasses.fields(STAGES[stage].config)}
        for key in fields:
            if key not in names:
                raise ConfigError(f"config field 'overrides.{stage}': {key!r} is not a field of {stage}"
                                  f"{closest(key, names)}")


def beside(root: str, name: str) -> str:
    """`name` in the folder that holds `root` (a bucket's top level stays inside the bucket)."""
    head, slash, _ = root.rstrip("/").rpartition("/")
    if not slash:
        return name
    return join(root, name) if not head or head.endswith(":/") else join(head, name)


def _samples(cfg: PipelineConfig) -> bool:
    """eval-llava samples its answers (temperature > 0, by the recipe or an override) in generate mode."""
    fields = {**recipes.stage_fields(cfg.recipe, "eval-llava"), "mode": cfg.eval_mode,
              **cfg.overrides.get("eval-llava", {})}
    return fields.get("mode") == "generate" and float(fields.get("temperature") or 0) > 0


@dataclass
class Node:
    name: str                  # unique, path-like: also the stage's output path below the root
    stage: str                 # registry stage name
    config: dict               # stage config fields (out included)
    deps: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return STAGES[self.stage].needs_gpu(self.config)


def build(cfg: PipelineConfig) -> list[Node]:
    """Nodes in a valid execution order (every node after its dependencies)."""
    root = cfg.root.rstrip("/")
    cache = cfg.cache.rstrip("/") or beside(root, "cache")
    nodes: list[Node] = []

    def add(name: str, stage: str, config: dict, deps: list[str], out: str | None = None) -> str:
        record = STAGES[stage]
        if record.compiles:  # one torch.compile cache for the run (their compile_cache)
            config = {**config, "compile_cache": join(root, "compile-cache")}
        if record.tracked:
            config = {**config, "tensorboard": cfg.tracking.get("tensorboard", True)}
            if cfg.tracking.get("wandb_project"):
                config = {**config, "wandb_project": cfg.tracking["wandb_project"]}
        if record.mlflow and cfg.tracking.get("mlflow_uri"):
            config = {**config, "mlflow_uri": cfg.tracking["mlflow_uri"],
                      "mlflow_experiment": cfg.tracking.get("mlflow_experiment") or "mysproj"}
        # the recipe's choices, then what this node is (models, data, seed, the eval mode), then the overrides
        merged = {**recipes.stage_fields(cfg.recipe, stage, config.get("strategy")), **config,
                  **cfg.overrides.get(stage, {})}
        merged["out"] = out or join(root, name)
        nodes.append(Node(name, stage, merged, deps))
        return name

    def fetched(source: list[str], content: str, tower: str | None = None,
                deps: list[str] | None = None) -> tuple[str, list[str]]:
        """(URI a stage reads, its dependencies): an origin's fetch output below the cache (one node per origin,
        however many stages read it), or a path or storage URI as it is."""
        if not is_remote(source[0]):
            return source[0], []
        out = output_uri(cache, source, content, tower)
        name = "fetch/" + out.rsplit("/", 1)[1]
        if not any(n.name == name for n in nodes):
            add(name, "fetch", {"source": source, "content": content, "tower": tower}, deps or [], out=out)
        return out, [name]

    model_deps: list[str] = []
    base_model = cfg.base_model
    if base_model is not None and is_remote(base_model):
        tower, tower_deps = fetched([cfg.vision_tower], "clip")
        base_model, model_deps = fetched([base_model], "llava", tower, tower_deps)
    if base_model is None:
        model_deps = [add(f"models/{cfg.model_preset}", "model-init", {"preset": cfg.model_preset}, [])]
        base_model = join(root, model_deps[0])
    clip_deps: list[str] = []
    clip_model = cfg.clip_model
    if clip_model is not None and is_remote(clip_model) and cfg.zero_shot:
        clip_model, clip_deps = fetched([clip_model], "clip")
    if clip_model is None and cfg.zero_shot:
        clip_deps = [add(f"models/{cfg.clip_preset}", "model-init", {"preset": cfg.clip_preset}, [])]
        clip_model = join(root, clip_deps[0])

    finals: list[str] = []
    for ds in cfg.datasets:
        prep_cfg = {"dataset": ds}
        source_deps: list[str] = []
        if not RECORDS[ds].embedded or ds in cfg.sources:
            prep_cfg["source"], source_deps = fetched(cfg.source_list(ds), "dataset")
        prep = add(f"{ds}/prep", "prep", prep_cfg, source_deps)
        data = join(root, prep)

        def rel(stage, setting=None, seed=None, _ds=ds):
            return layout.stage_uri("", _ds, stage, setting, seed).lstrip("/")

        if cfg.zero_shot:
            finals.append(add(rel("eval-clip", layout.ZERO_SHOT), "eval-clip",
                              {"model": clip_model, "data": data}, [prep, *clip_deps]))
            zero_shot_llava = {"model": base_model, "data": data, "mode": cfg.eval_mode}
            if _samples(cfg):  # sampled answers differ by seed: one evaluation per seed, as the fine-tuned ones
                for seed in cfg.seeds:
                    finals.append(add(rel("eval-llava", layout.ZERO_SHOT, seed), "eval-llava",
                                      {**zero_shot_llava, "seed": seed}, [prep, *model_deps]))
            else:
                finals.append(add(rel("eval-llava", layout.ZERO_SHOT), "eval-llava", zero_shot_llava,
                                  [prep, *model_deps]))
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
                                  {"model": tuned, "data": data, "mode": cfg.eval_mode, "seed": seed},
                                  [prep, tuned_dep]))
                if cfg.probe:
                    finals.append(add(rel("probe", setting, seed), "probe",
                                      {"model": tuned, "data": data, "seed": seed}, [prep, tuned_dep]))
    add("report", "report", {"runs": [root]}, finals)
    return nodes
