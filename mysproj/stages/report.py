"""`mysproj report --runs URI... --out URI`: report.md, results.parquet and plots from finished evals/probes."""

from __future__ import annotations

import io
import logging
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from mysproj.errors import BadInput
from mysproj.report import plots, tables
from mysproj.report.gather import gather
from mysproj.report.time_table import time_section
from mysproj.report.training import loss_plots, section, trainings
from mysproj.storage import get_file
from mysproj.storage.manifest import run_stage
from mysproj.tracking.mlflow_log import report_artifacts

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    return run_stage("report", cfg, lambda out: _body(cfg, out))


def _body(cfg, out) -> dict:
    runs = gather(cfg.runs)
    if not runs:
        raise BadInput(f"report: no finished eval-clip/eval-llava/probe outputs under {', '.join(cfg.runs)}; "
                       f"run those stages first")
    text, table1_rows = tables.render(runs)
    trained = trainings(cfg.runs)
    out.write_text("report.md", "\n".join([text, *section(trained), *time_section(cfg.runs)]))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(tables.results_rows(runs)), buf)
    out.write_bytes("results.parquet", buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        names = plots.write_all(runs, tmp) + loss_plots(trained, tmp)
        out.put_dir(tmp, "plots")
    tracked = _mlflow(cfg, out) if cfg.mlflow_uri else {}
    log.info("report: %d runs, %d plots -> %s", len(runs), len(names), out.path("report.md"))
    return {**tracked, "runs": len(runs), "report": out.path("report.md"), "table1_rows": table1_rows,
            "random_weights": any(r.provenance.get("random_weights") for r in runs)}


def _mlflow(cfg, out) -> dict:
    """report.md, results.parquet and the plots as artifacts of the run's MLflow parent run."""

    with tempfile.TemporaryDirectory() as tmp:
        for name in out.files:
            if name in ("report.md", "results.parquet") or name.startswith("plots/"):
                get_file(out.path(name), os.path.join(tmp, name))
        return {"mlflow": report_artifacts(cfg, tmp)}
