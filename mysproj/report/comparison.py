"""A finished run's Table 1 against the paper's: one check per (row, metric) with the mean over seeds, as the paper
reports it, under an absolute tolerance. `mysproj reproduce` prints it and decides its exit code from it; the
paper's value it compares with is the one report.md prints beside ours (`paper.table1_value`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from mysproj.report.paper import table1_value
from mysproj.report.tables import TABLE1_ROWS

DEFAULT_TOLERANCE = 0.01  # absolute, on macro-F1 and accuracy in [0, 1]: the paper's σ < 1%
METRICS = (("macro_f1", "F1", 0), ("accuracy", "Acc", 1))  # results.parquet column, label, index in TABLE1 pairs


@dataclass
class Check:
    row: str          # Table 1 row name ("LLaVA-1.5 FT-Proj")
    metric: str       # "F1" / "Acc"
    ours: float
    paper: float | None
    seeds: int
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.paper is None else self.ours - self.paper

    @property
    def within(self) -> bool | None:
        return None if self.paper is None else abs(self.delta) <= self.tolerance + 1e-12


def compare(rows: list[dict], dataset: str, tolerance: float) -> list[Check]:
    """One Check per (Table 1 row, metric) present in `rows` (results.parquet records) for `dataset`; the value is
    the mean over seeds, as the paper's."""
    checks = []
    for name, stage, setting in TABLE1_ROWS:
        mine = [r for r in rows if r.get("dataset") == dataset and r.get("stage") == stage
                and r.get("setting") == setting and not r.get("block")]
        ref = table1_value(name, dataset)
        for column, label, i in METRICS:
            vals = [float(r[column]) for r in mine if r.get(column) is not None]
            if vals:
                checks.append(Check(name, label, statistics.fmean(vals), ref[i] if ref else None, len(vals),
                                    tolerance))
    return checks


def verdict(checks: list[Check], random_weights: bool) -> tuple[bool, str]:
    """(reproduced or not enforced, one line) for a finished run's comparison."""
    compared = [c for c in checks if c.within is not None]
    outside = [c for c in compared if not c.within]
    if random_weights:
        return True, (f"random weights: comparison reported, not enforced ({len(compared) - len(outside)} of "
                      f"{len(compared)} metrics within ±{_tol(checks)})")
    if not compared:
        return False, "no metric of this run has a published value to compare with: not a reproduction"
    if outside:
        worst = max(outside, key=lambda c: abs(c.delta))
        return False, (f"NOT reproduced: {len(outside)} of {len(compared)} metrics outside ±{_tol(checks)} "
                       f"(worst: {worst.row} {worst.metric} {worst.ours:.4f} vs {worst.paper:.4f})")
    return True, f"reproduced: all {len(compared)} metrics within ±{_tol(checks)} of the paper"


def _tol(checks: list[Check]) -> str:
    return f"{checks[0].tolerance:g}" if checks else f"{DEFAULT_TOLERANCE:g}"


def render_checks(checks: list[Check]) -> str:
    header = ("Model", "Metric", "Ours", "Paper", "Δ", "Tolerance", "Within")
    table = [header]
    for c in checks:
        table.append((c.row, c.metric, f"{c.ours:.4f}" + (f" (n={c.seeds})" if c.seeds > 1 else ""),
                      "—" if c.paper is None else f"{c.paper:.4f}",
                      "—" if c.delta is None else f"{c.delta:+.4f}", f"±{c.tolerance:g}",
                      {True: "yes", False: "NO", None: "n/a"}[c.within]))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


def as_json(checks: list[Check]) -> list[dict]:
    return [{"row": c.row, "metric": c.metric, "ours": c.ours, "paper": c.paper, "delta": c.delta,
             "within": c.within, "seeds": c.seeds} for c in checks]
