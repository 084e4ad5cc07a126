"""PNG plots for the report (matplotlib, Agg backend): F1 per setting per dataset, pre/post-projection
richness beside the MLLM, and one confusion matrix per evaluation (its lowest seed)."""

from __future__ import annotations

import os

from mysproj.report import tables as T
from mysproj.report.gather import Run
from mysproj.report.paper import SETTING_NAMES


def _plt():
    import matplotlib  # noqa: PLC0415 - a slow import: only the report's plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - a slow import: only the report's plots

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("macro-F1")
    ax.legend(fontsize=8)


def f1_per_setting(runs: list[Run], path: str) -> None:
    plt = _plt()
    ds = T.datasets_of(runs)
    series = {}
    for name, stage, setting in T.TABLE1_ROWS:
        vals = [T.mean(T.values(runs, d, stage, setting, "macro_f1")) for d in ds]
        if any(v is not None for v in vals):
            series[name] = vals
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(ds)), 4))
    _bars(ax, ds, series)
    ax.set_title("Macro-F1 per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def richness(runs: list[Run], path: str) -> None:
    plt = _plt()
    ds = T.datasets_of(runs)
    fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds):
        settings = [s for s in T.TABLE2_SETTINGS
                    if T.values(runs, d, "probe", s, "macro_f1", "post") or T.values(runs, d, "eval-llava", s,
                                                                                      "macro_f1")]
        series = {
            "pre-proj MLP": [T.mean(T.values(runs, d, "probe", s, "macro_f1", "pre")) for s in settings],
            "post-proj MLP": [T.mean(T.values(runs, d, "probe", s, "macro_f1", "post")) for s in settings],
            "MLLM": [T.mean(T.values(runs, d, "eval-llava", s, "macro_f1")) for s in settings],
        }
        _bars(ax, [SETTING_NAMES.get(s, s) for s in settings], series)
        ax.set_title(d)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion(run: Run, path: str) -> None:
    plt = _plt()
    m = run.metrics
    cm = m["confusion_matrix"]
    cols = m.get("confusion_columns") or m["labels"]
    size = max(4, 0.3 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if len(cols) <= 16:
        peak = max(max(row) for row in cm) or 1
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    ax.set_yticks(range(len(m["labels"])), m["labels"], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run.dataset} {run.setting} {run.stage}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(runs: list[Run], folder: str) -> list[str]:
    """Write every plot into `folder`; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    if runs:
        f1_per_setting(runs, os.path.join(folder, "f1_per_setting.png"))
        names.append("f1_per_setting.png")
    if any(r.stage == "probe" for r in runs):
        richness(runs, os.path.join(folder, "richness.png"))
        names.append("richness.png")
    seen = set()
    for r in runs:
        key = (r.dataset, r.setting, r.stage)
        if r.stage == "probe" or key in seen or "confusion_matrix" not in r.metrics:
            continue
        seen.add(key)
        name = f"confusion_{r.dataset}_{r.setting}_{r.stage}.png"
        confusion(r, os.path.join(folder, name))
        names.append(name)
    return names
