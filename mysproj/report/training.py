"""The report's Training section: each fine-tuning run's loss against its step (one plot per dataset, seeds
overlaid) and a line per run with its final loss and steps, from the `metrics.jsonl` every fine-tuning writes
(a point every `log_every` steps). No ML imports: the report runs in the slim image too."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from mysproj.config.registry import summary_of
from mysproj.errors import BadInput, IncompleteOutput
from mysproj.report.gather import _locate
from mysproj.report.plots import _plt
from mysproj.storage.manifest import StageInput

log = logging.getLogger(__name__)


@dataclass
class Training:
    name: str                  # the output's path below its run root: dtd/ft-projector/seed0/finetune
    dataset: str
    setting: str
    seed: int | None
    strategy: str
    steps: int | None          # optimizer steps of the run
    final_loss: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def trainings(roots: list[str]) -> list[Training]:
    """Every finished fine-tuning below `roots`, in dataset, setting, seed order."""
    found = []
    for root in roots:
        for uri, where in _locate(root):
            if where["stage"] != "finetune":
                continue
            out = StageInput.if_complete(uri, expect_stage="finetune")
            if out is None:  # its manifest is damaged: an incomplete output (`read_manifest` said so)
                continue
            summary = summary_of(out.manifest)
            curve = []
            if "metrics.jsonl" in out.files:
                try:
                    for line in out.read_text("metrics.jsonl").splitlines():
                        rec = json.loads(line) if line.strip() else {}
                        if isinstance(rec.get("loss"), (int, float)) and isinstance(rec.get("step"), int):
                            curve.append((rec["step"], float(rec["loss"])))
                except (IncompleteOutput, BadInput, json.JSONDecodeError) as e:
                    log.warning("report: %s: loss curve left out (%s)", uri, e)
            name = "/".join(uri.rstrip("/").split("/")[-(3 if where["seed"] is None else 4):])
            found.append(Training(name, where["dataset"], where["setting"], where["seed"],
                                  (out.manifest.get("config") or {}).get("strategy", where["setting"]),
                                  summary.steps, summary.final_loss, curve))
    found.sort(key=lambda t: (t.dataset, t.setting, -1 if t.seed is None else t.seed, t.name))
    return found


def section(runs: list[Training]) -> list[str]:
    """report.md lines: one per fine-tuning run, with its final loss and steps (none without runs)."""
    if not runs:
        return []
    lines = ["## Training", "", "Loss against step per dataset: `plots/loss_<dataset>.png` (seeds overlaid).", ""]
    for t in runs:
        loss = f"{t.final_loss:.4f}" if isinstance(t.final_loss, (int, float)) else "—"
        steps = t.steps if t.steps is not None else "—"
        lines.append(f"- `{t.name}`: {t.strategy}, {steps} steps, final loss {loss}")
    return [*lines, ""]


def loss_plots(runs: list[Training], folder: str) -> list[str]:
    """One PNG per dataset with a loss curve per fine-tuning run; returns the file names."""

    names = []
    for dataset in sorted({t.dataset for t in runs if t.curve}):
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in runs:
            if t.dataset == dataset and t.curve:
                steps, losses = zip(*t.curve)
                label = t.setting + (f" seed{t.seed}" if t.seed is not None else "")
                ax.plot(steps, losses, marker="." if len(steps) < 30 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_title(f"{dataset}: fine-tuning loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"loss_{dataset}.png"
        os.makedirs(folder, exist_ok=True)
        fig.savefig(os.path.join(folder, name), dpi=100)
        plt.close(fig)
        names.append(name)
    return names
