"""`mysproj reproduce --dataset dtd` (and `make reproduce DATASET=dtd`): one reproduction, end to end, against the
current kube context.

1. `helm install` a fresh release of `charts/mysproj` with the dataset's values file (`mysproj.kube.helm`);
2. wait for the run, printing the `mysproj status` table whenever a stage changes state (`kube.watch.wait`);
3. fetch `report/` (report.md, results.parquet, plots) from object storage into a local folder
   (`mysproj.report.fetch`);
4. print Table 1 and compare each metric with the paper's (`mysproj.report.comparison`) under the values file's
   `reproduce.tolerance` (absolute, default 0.01). With random-weight models the comparison is printed, not
   enforced.

Exit codes: 0 matched (or not enforced), 1 a metric outside the tolerance, 2 the run failed or timed out (the
release is kept for `mysproj status` / `mysproj logs`), 64 bad input (values file, helm refusing the values...).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mysproj.config.fields import read_values
from mysproj.config.registry import summary_of
from mysproj.errors import BadInput
from mysproj.kube import bucket, watch
from mysproj.kube import helm as H
from mysproj.kube.cluster import Cluster
from mysproj.kube.controller import read_pipeline
from mysproj.kube.table import find_configmap
from mysproj.report import comparison
from mysproj.report.fetch import fetch_report, table1_text

EXIT_MISMATCH = 1
EXIT_RUN_FAILED = 2
_DATASET = re.compile(r"^[a-z0-9][-a-z0-9_]*$")


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
    p.add_argument("--chart", default=str(H.DEFAULT_CHART), help="chart folder")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait for the run")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between status polls")
    p.add_argument("--tolerance", type=float, default=None,
                   help="override the values file's reproduce.tolerance (absolute)")
    p.add_argument("--out", default=None, help="local folder for the fetched report (default: reproduce-<release>)")
    p.add_argument("--keep", action="store_true", help="keep the release after a complete run (default: "
                                                       "uninstall it; outputs stay in the bucket)")
    p.set_defaults(func=run)


def run(ns, out=print) -> int:
    if not _DATASET.match(ns.dataset):
        raise BadInput(f"--dataset {ns.dataset!r}: expected a dataset name such as dtd")
    chart = Path(ns.chart)
    vfile = H.values_file(ns.dataset, ns.values, chart)
    tolerance = H.release_tolerance(read_values(vfile), chart, ns.tolerance)
    seeds = parse_seeds(ns.seeds)
    release = H.check_release(ns.release or H.default_release(ns.dataset))
    cluster = Cluster(ns.namespace, ns.context)
    namespace = cluster.namespace

    args = H.helm_args(release, chart, vfile, namespace, ns.dataset, seeds, ns.sets, ns.context)
    out(f"reproduce: helm {' '.join(args)}")
    result = H.helm(args)
    if result.returncode != 0:
        # Helm refuses bad values (schema), an existing release name, an unreachable cluster: nothing was started.
        why = "; ".join(ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip())
        raise BadInput(f"helm install {release} failed: {why.removeprefix('Error: ')}")
    pipeline, templates = read_pipeline(cluster, find_configmap(cluster, release))
    access = bucket.bucket_access(pipeline.root, templates.get("cpu"))
    if access.problem:  # the report could not be fetched: say so now, not after the run
        raise BadInput(f"bucket {pipeline.root} not read: {access.problem}; the release {release} keeps running "
                       f"(mysproj status {release} -n {namespace})")
    out(f"reproduce: release {release} installed in namespace {namespace}; waiting "
        f"(also: mysproj status {release} -n {namespace} --watch)")
    with bucket.using(access.settings):  # the run's bucket, as its pods reach it, for the wait and the report
        return _follow(ns, out, cluster, release, pipeline.root, tolerance)


def _follow(ns, out, cluster, release: str, root: str, tolerance: float) -> int:
    """Wait for the run, then fetch its report and compare it with the paper's; the exit code says how it went."""

    namespace = cluster.namespace
    state, rows = watch.wait(cluster, release, ns.timeout, ns.interval, out)
    if state != "complete":
        failed = [r for r in rows if r.state == "failed"]
        why = "; ".join(f"{r.node}: {r.reason}" for r in failed) or "no stage failed"
        what = f"did not finish within {ns.timeout:g} s" if state == "timeout" else "failed"
        out(f"reproduce: run {release} {what} ({why}); the release is kept: mysproj status {release} -n "
            f"{namespace}, mysproj logs {release} STAGE -n {namespace}")
        return EXIT_RUN_FAILED

    dest = Path(ns.out or f"reproduce-{release}")
    manifest, result_rows = fetch_report(root, dest)
    out(f"reproduce: report fetched to {dest}/ (report.md, results.parquet, plots/)")
    out("\nTable 1 (ours, the paper's in parentheses):")
    out(table1_text(manifest, dest))
    random_weights = summary_of(manifest).random_weights \
        or any(r.get("random_weights") for r in result_rows)
    checks = comparison.compare(result_rows, ns.dataset, tolerance)
    matched, line = comparison.verdict(checks, random_weights)
    code = 0 if matched else EXIT_MISMATCH
    out("\nComparison with the paper (Table 1, mean over seeds):")
    out(comparison.render_checks(checks))
    out(f"\nreproduce: {line}")
    (dest / "comparison.json").write_text(json.dumps({
        "release": release, "dataset": ns.dataset, "tolerance": tolerance, "random_weights": random_weights,
        "enforced": not random_weights, "exit_code": code, "verdict": line,
        "checks": comparison.as_json(checks)}, indent=2))
    if not ns.keep:
        done = H.helm(["uninstall", release, "--namespace", namespace]
                      + (["--kube-context", ns.context] if ns.context else []))
        out(f"reproduce: release {release} uninstalled" if done.returncode == 0
            else f"reproduce: helm uninstall {release} failed: {done.stderr.strip()}")
    sys.stdout.flush()
    return code

