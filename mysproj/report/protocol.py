"""The report's "Protocol" section: for every gathered run, which recipe it followed and every choice that departs
from the paper's text, read from the configs in the stage manifests it descends from (its own, the prep output it
read, and the fine-tune behind its model), so two reports can be compared without opening a config."""

from __future__ import annotations

from mysproj.config.lineage import finetune_config
from mysproj.config.lineage import stage_config as _config
from mysproj.config.recipes import RECIPES, Choice, applicable
from mysproj.report.gather import Run, run_name

# Which prep choices bear on a run: CLIP reads only the label strings; a probe of an untuned model reads neither.
PREP_CHOICES = {"eval-clip": ("label rule",), "eval-llava": ("prompt ending", "label rule")}
NOT_RECORDED = object()


def run_choices(run: Run, cache: dict) -> list[tuple[Choice, object]]:
    """(choice, the value this run had, or NOT_RECORDED) for every choice that bears on the run."""
    cfg = run.manifest.get("config") or {}
    tuned = finetune_config(cfg.get("model"), cache)
    found: list[tuple[Choice, dict]] = []
    prep = (_config(cfg.get("data"), cache) or {}).get("config", {})
    prep_labels = PREP_CHOICES.get(run.stage, ("prompt ending", "label rule") if tuned else ())
    found += [(c, prep) for c in applicable("prep") if c.label in prep_labels]
    if tuned is not None:
        found += [(c, tuned) for c in applicable("finetune", tuned.get("strategy"))]
    if run.stage in ("probe", "eval-llava"):
        found += [(c, cfg) for c in applicable(run.stage)]
    return [(c, source.get(c.field, NOT_RECORDED)) for c, source in found]


def recipe_name(choices: list[tuple[Choice, object]]) -> str:
    """The recipe every recorded value matches (paper first where both do), else "mixed"."""
    for recipe in RECIPES:
        if all(v is NOT_RECORDED or v == c.value(recipe) for c, v in choices):
            return recipe
    return "mixed"


def _departures(choices: list[tuple[Choice, object]]) -> list[str]:
    out = []
    for c, v in choices:
        if v is NOT_RECORDED:
            out.append(f"{c.label} not recorded")
        elif v != c.paper:
            out.append(f"{c.label} `{v}` (paper's text: `{c.paper}`)")
    return out


def _ran(run: Run) -> str:
    """What the run did where the choice is this project's own: eval-llava's decoding, the probe's vectors."""
    cfg = run.manifest.get("config") or {}
    if run.stage == "eval-llava":
        return run.metrics.get("decoding") or ""
    if run.stage == "probe" and "pre_cls" in run.metrics:
        return f"both pre-projection vectors (CLS pooled, layer -2 patch mean), headline `{cfg.get('pre_pooling')}`"
    return ""


def protocol_lines(runs: list[Run]) -> list[str]:
    cache: dict = {}
    lines = ["Recipe per run: `paper` = the paper's text, `released` = the released scripts as shipped "
             "(docs/recipe.md); then every choice that departs from the paper's text.", ""]
    for r in runs:
        choices = run_choices(r, cache)
        departures = _departures(choices)
        ran = _ran(r)
        lines.append(f"- `{run_name(r)}`: recipe {recipe_name(choices)}; "
                     + ("; ".join(departures) if departures else "nothing departs from the paper's text")
                     + (f". Ran: {ran}." if ran else ""))
    return lines
