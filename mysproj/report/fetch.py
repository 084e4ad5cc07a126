"""A finished run's report (report.md, results.parquet, plots/) copied from its run root into a local folder, each
file verified against the report's manifest; what `mysproj reproduce` shows and compares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.storage import join
from mysproj.storage.manifest import StageInput


def fetch_report(root: str, dest: Path) -> tuple[dict, list[dict]]:
    """Copy the run's verified report (report.md, results.parquet, plots/) into `dest`; (manifest, result rows)."""

    report = StageInput(join(root, "report"), expect_stage="report")  # refuses a report without its manifest
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(report.manifest.get("files") or {}):
        if name.startswith("/") or ".." in name.split("/"):
            raise BadInput(f"{report.uri}: manifest entry {name!r} points outside the report folder")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report.local_path(name), target)  # sha256-verified against the manifest
    (dest / "_SUCCESS.json").write_text(json.dumps(report.manifest, indent=2, sort_keys=True))
    rows = pq.read_table(dest / "results.parquet").to_pylist()
    return report.manifest, rows


def table1_text(manifest: dict, dest: Path) -> str:
    """Table 1's rows as report.md prints them: from the report's summary, else from the fetched report.md."""
    text = summary_of(manifest).table1_rows
    if text:
        return text
    md = (dest / "report.md").read_text() if (dest / "report.md").exists() else ""
    lines = [ln for ln in md.split("## Table 1", 1)[-1].splitlines()[1:] if ln.startswith("|")]
    return "\n".join(lines)
