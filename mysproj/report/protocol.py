"""The report's "Protocol" section: for every gathered run, which recipe it followed and every choice that departs
from the paper's text, read from the configs in the stage manifests it descends from (its own, the prep output it
read, and the fine-tune behind its model), so two reports can be compared without opening a config."""

from __future__ import annotations

from mysproj.config.recipes import RECIPES, Choice, applicable
from mysproj.report.gather import Run
from mysproj.report.tables import run_name
from mysproj.storage.manifest import read_manifest

# Which prep choices bear on a run: CLIP reads only the label strings; a probe of an untuned model reads neither.
PREP_CHOICES = {"eval-clip": ("label rule",), "eval-llava": ("prompt ending", "label rule")}
NOT_RECORDED = object()


def _config(uri: str | None, cache: dict) -> dict | None:
    """The config and stage of the stage output at `uri` ({"stage", "config"}), or None (not a stage output)."""
    if not uri:
        return None
    if uri not in cache:
        m = read_manifest(uri)
        cache[uri] = None if m is None else {"stage": m.get("stage"), "config": m.get("config") or {}}
    return cache[uri]


def finetune_config(model_uri: str | None, cache: dict) -> dict | None:
    """The finetune config behind a model: the model itself (full/lora) or the projector a merge put in."""
    out = _config(model_uri, cache)
    if out and out["stage"] == "merge":
        out = _config(out["config"].get("projector"), cache)
    return out["config"] if out and out["stage"] == "finetune" else None


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


def protocol_lines(runs: list[Run]) -> list[str]:
    cache: dict = {}
    lines = ["Recipe per run: `paper` = the paper's text, `released` = the seed's scripts as shipped (docs/recipe.md); "
             "then every choice that departs from the paper's text.", ""]
    for r in runs:
        choices = run_choices(r, cache)
        departures = _departures(choices)
        lines.append(f"- `{run_name(r)}`: recipe {recipe_name(choices)}; "
                     + ("; ".join(departures) if departures else "nothing departs from the paper's text"))
    return lines
