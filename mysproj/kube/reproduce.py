"""`mysproj reproduce --dataset dtd` (and `make reproduce DATASET=dtd`): one reproduction, end to end, against the
current kube context.

1. `helm install` a fresh release of `charts/mysproj` with the dataset's values file (`helm` from PATH);
2. wait for the run, printing the `mysproj status` table whenever a stage changes state;
3. fetch `report/` (report.md, results.parquet, plots) from object storage into a local folder;
4. print Table 1 and compare each metric with the paper's (`mysproj.report.paper.TABLE1`) under the values file's
   `reproduce.tolerance` (absolute, default 0.01: the paper's σ < 1%). With random-weight models the comparison is
   printed, not enforced.

Exit codes: 0 matched (or not enforced), 1 a metric outside the tolerance, 2 the run failed or timed out (the
release is kept for `mysproj status` / `mysproj logs`), 64 bad input (values file, helm refusing the values...).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import statistics
import subprocess  # nosec B404 - runs helm with an argv list
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from mysproj.errors import BadInput

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHART = REPO / "charts" / "mysproj"
DEFAULT_TOLERANCE = 0.01
EXIT_MISMATCH = 1
EXIT_RUN_FAILED = 2
_RELEASE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?$")
_DATASET = re.compile(r"^[a-z0-9][-a-z0-9_]*$")
METRICS = (("macro_f1", "F1", 0), ("accuracy", "Acc", 1))  # results.parquet column, label, index in TABLE1 pairs


# --------------------------------------------------------------------------------------------------- comparison

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
    from mysproj.report import paper as P
    from mysproj.report.tables import TABLE1_ROWS

    task = P.DATASET_TASK.get(dataset)
    checks = []
    for name, stage, setting in TABLE1_ROWS:
        mine = [r for r in rows if r.get("dataset") == dataset and r.get("stage") == stage
                and r.get("setting") == setting and not r.get("block")]
        ref = P.TABLE1.get(name, {}).get(task) if task else None
        for column, label, i in METRICS:
            vals = [float(r[column]) for r in mine if r.get(column) is not None]
            if vals:
                checks.append(Check(name, label, statistics.fmean(vals), ref[i] if ref else None, len(vals),
                                    tolerance))
    return checks


def verdict(checks: list[Check], random_weights: bool) -> tuple[int, str]:
    """(exit code, one line) for a finished run's comparison."""
    compared = [c for c in checks if c.within is not None]
    outside = [c for c in compared if not c.within]
    if random_weights:
        return 0, (f"random weights: comparison reported, not enforced ({len(compared) - len(outside)} of "
                   f"{len(compared)} metrics within ±{_tol(checks)})")
    if not compared:
        return EXIT_MISMATCH, "no metric of this run has a published value to compare with: not a reproduction"
    if outside:
        worst = max(outside, key=lambda c: abs(c.delta))
        return EXIT_MISMATCH, (f"NOT reproduced: {len(outside)} of {len(compared)} metrics outside ±{_tol(checks)} "
                               f"(worst: {worst.row} {worst.metric} {worst.ours:.4f} vs {worst.paper:.4f})")
    return 0, f"reproduced: all {len(compared)} metrics within ±{_tol(checks)} of the paper"


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


# --------------------------------------------------------------------------------------------------- values

def values_file(dataset: str, given: str | None, chart: Path) -> Path:
    path = Path(given) if given else chart / f"values-{dataset}.yaml"
    if not path.is_file():
        examples = ", ".join(sorted(p.name for p in chart.glob("values-*.yaml")))
        hint = "" if given else f"; pass --values FILE (examples in {chart}: {examples})"
        raise BadInput(f"values file {path} not found{hint}")
    return path


def tolerance_of(values: dict, override: float | None) -> float:
    """`reproduce.tolerance` of the values file (absolute, on macro-F1 and accuracy in [0, 1])."""
    if override is not None:
        tol = override
    else:
        block = values.get("reproduce") or {}
        if not isinstance(block, dict):
            raise BadInput("values field 'reproduce' must be a mapping (reproduce: {tolerance: 0.01})")
        tol = block.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
        raise BadInput(f"values field 'reproduce.tolerance' must be a number in [0, 1], got {tol!r}")
    return float(tol)


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers (0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def default_release(dataset: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"repro-{dataset.replace('_', '-')[:20]}-{stamp}".lower()


def helm_args(release: str, chart: Path, values: Path, namespace: str | None, dataset: str,
              seeds: list[int] | None, sets: list[str], context: str | None) -> list[str]:
    args = ["install", release, str(chart), "-f", str(values),
            "--set-json", f"pipeline.datasets={json.dumps([dataset])}"]
    if seeds is not None:
        args += ["--set-json", f"pipeline.seeds={json.dumps(seeds)}"]
    for s in sets:
        if "=" not in s:
            raise BadInput(f"--set {s!r}: expected key=value")
        args += ["--set", s]
    if namespace:
        args += ["--namespace", namespace]
    if context:
        args += ["--kube-context", context]
    return args


def helm(args: list[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("helm")
    if not exe:
        raise BadInput("helm not found on PATH (make tools puts it in .tools/bin)")
    return subprocess.run([exe, *args], capture_output=True, text=True)  # nosec B603 - helm from PATH, argv list, no shell


# --------------------------------------------------------------------------------------------------- waiting

def wait(cluster, release: str, timeout: float, interval: float, out=print) -> tuple[str, list]:
    """Poll the run like `mysproj status --watch`, printing the table whenever a stage changes state (and a one-line
    heartbeat at least every minute); returns ('complete' | 'failed' | 'timeout', last rows)."""
    from mysproj.kube import status

    deadline = time.monotonic() + timeout
    t0 = last_print = time.monotonic()
    last_states = None
    rows: list = []
    while True:
        try:
            rows = status.collect(cluster, release)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - an API server or bucket blip must not end the wait
            log.warning("status: %s: %s; retrying", type(e).__name__, e)
            rows = rows or []
        else:
            states = [(r.node, r.state) for r in rows]
            now = time.monotonic()
            if states != last_states:
                out(status.render(rows))
                out("")
                last_states, last_print = states, now
            elif now - last_print >= 60:
                done = sum(r.state in ("complete", "reused") for r in rows if r.stage != "controller")
                running = [r.node + (f" ({r.progress})" if r.progress else "") for r in rows if r.state == "running"]
                out(f"[{now - t0:.0f}s] {done}/{len(rows) - 1} stages done; running: {', '.join(running) or '-'}")
                last_print = now
            ctl = next((r for r in rows if r.stage == "controller"), None)
            stage_failed = any(r.state == "failed" for r in rows if r.stage != "controller")
            if ctl is not None and ctl.state == "complete":
                return "complete", rows
            if (ctl is not None and ctl.state == "failed") or stage_failed:
                return "failed", rows
        if time.monotonic() >= deadline:
            return "timeout", rows
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------- report

def fetch_report(root: str, dest: Path) -> tuple[dict, list[dict]]:
    """Copy the run's verified report (report.md, results.parquet, plots/) into `dest`; (manifest, result rows)."""
    import pyarrow.parquet as pq

    from mysproj.storage import join
    from mysproj.storage.manifest import StageInput

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
    text = (manifest.get("summary") or {}).get("table1_rows")
    if text:
        return text
    md = (dest / "report.md").read_text() if (dest / "report.md").exists() else ""
    lines = [ln for ln in md.split("## Table 1", 1)[-1].splitlines()[1:] if ln.startswith("|")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- command

def add_command(sub, parser_class) -> None:
    p = sub.add_parser("reproduce", help="install a fresh run of the chart for one dataset, wait, fetch the report "
                                         "and compare Table 1 with the paper (exit code says whether it matched)")
    p.add_argument("--dataset", required=True, help="dataset to reproduce (dtd, plantdoc, dermnet, crisismmd, ...)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the values file's)")
    p.add_argument("--values", default=None, help="values file (default: charts/mysproj/values-<dataset>.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra helm --set (repeatable), e.g. images.cpu.repository=REGISTRY/mysproj-cpu")
    p.add_argument("--release", default=None, help="release name (default: repro-<dataset>-<UTC time>)")
    p.add_argument("--namespace", "-n", default=None, help="namespace (default: the kubeconfig context's)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--chart", default=str(DEFAULT_CHART), help="chart folder")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait for the run")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between status polls")
    p.add_argument("--tolerance", type=float, default=None,
                   help="override the values file's reproduce.tolerance (absolute)")
    p.add_argument("--out", default=None, help="local folder for the fetched report (default: reproduce-<release>)")
    p.add_argument("--keep", action="store_true", help="keep the release after a complete run (default: "
                                                       "uninstall it; outputs stay in the bucket)")
    p.set_defaults(func=run)


def run(ns, out=print) -> int:
    from mysproj.kube import status
    from mysproj.kube.cluster import Cluster
    from mysproj.kube.controller import read_pipeline

    if not _DATASET.match(ns.dataset):
        raise BadInput(f"--dataset {ns.dataset!r}: expected a dataset name such as dtd")
    chart = Path(ns.chart)
    vfile = values_file(ns.dataset, ns.values, chart)
    try:
        values = yaml.safe_load(vfile.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"{vfile}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise BadInput(f"{vfile}: a values file must be a YAML mapping")
    defaults = yaml.safe_load((chart / "values.yaml").read_text()) if (chart / "values.yaml").is_file() else {}
    block = {**((defaults or {}).get("reproduce") or {}), **(values.get("reproduce") or {})} \
        if isinstance(values.get("reproduce", {}), dict) else values["reproduce"]
    tolerance = tolerance_of({"reproduce": block}, ns.tolerance)
    seeds = parse_seeds(ns.seeds)
    release = ns.release or default_release(ns.dataset)
    if not _RELEASE.match(release):
        raise BadInput(f"release name {release!r}: lowercase letters, digits and '-', at most 53 characters")
    cluster = Cluster(ns.namespace, ns.context)
    namespace = cluster.namespace

    args = helm_args(release, chart, vfile, namespace, ns.dataset, seeds, ns.sets, ns.context)
    out(f"reproduce: helm {' '.join(args)}")
    result = helm(args)
    if result.returncode != 0:
        # Helm refuses bad values (schema), an existing release name, an unreachable cluster: nothing was started.
        why = "; ".join(ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip())
        raise BadInput(f"helm install {release} failed: {why.removeprefix('Error: ')}")
    pipeline, templates = read_pipeline(cluster, status.find_configmap(cluster, release))
    problem = status.bucket_access(pipeline.root, templates.get("cpu"))
    if problem:  # the report could not be fetched: say so now, not after the run
        raise BadInput(f"bucket {pipeline.root} not read: {problem}; the release {release} keeps running "
                       f"(mysproj status {release} -n {namespace})")
    out(f"reproduce: release {release} installed in namespace {namespace}; waiting "
        f"(also: mysproj status {release} -n {namespace} --watch)")

    state, rows = wait(cluster, release, ns.timeout, ns.interval, out)
    if state != "complete":
        failed = [r for r in rows if r.state == "failed"]
        why = "; ".join(f"{r.node}: {r.reason}" for r in failed) or "no stage failed"
        what = f"did not finish within {ns.timeout:g} s" if state == "timeout" else "failed"
        out(f"reproduce: run {release} {what} ({why}); the release is kept: mysproj status {release} -n "
            f"{namespace}, mysproj logs {release} STAGE -n {namespace}")
        return EXIT_RUN_FAILED

    dest = Path(ns.out or f"reproduce-{release}")
    manifest, result_rows = fetch_report(pipeline.root, dest)
    out(f"reproduce: report fetched to {dest}/ (report.md, results.parquet, plots/)")
    out("\nTable 1 (ours, the paper's in parentheses):")
    out(table1_text(manifest, dest))
    random_weights = bool((manifest.get("summary") or {}).get("random_weights")) \
        or any(r.get("random_weights") for r in result_rows)
    checks = compare(result_rows, ns.dataset, tolerance)
    code, line = verdict(checks, random_weights)
    out("\nComparison with the paper (Table 1, mean over seeds):")
    out(render_checks(checks))
    out(f"\nreproduce: {line}")
    (dest / "comparison.json").write_text(json.dumps({
        "release": release, "dataset": ns.dataset, "tolerance": tolerance, "random_weights": random_weights,
        "enforced": not random_weights, "exit_code": code, "verdict": line,
        "checks": [{"row": c.row, "metric": c.metric, "ours": c.ours, "paper": c.paper, "delta": c.delta,
                    "within": c.within, "seeds": c.seeds} for c in checks]}, indent=2))
    if not ns.keep:
        done = helm(["uninstall", release, "--namespace", namespace]
                    + (["--kube-context", ns.context] if ns.context else []))
        out(f"reproduce: release {release} uninstalled" if done.returncode == 0
            else f"reproduce: helm uninstall {release} failed: {done.stderr.strip()}")
    sys.stdout.flush()
    return code

