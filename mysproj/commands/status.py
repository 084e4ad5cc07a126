"""`mysproj status RELEASE [--watch]` and `mysproj logs RELEASE STAGE` (registered in mysproj/cli.py): the table
is `mysproj.kube.table`'s, the polling `mysproj.kube.watch`'s, the logs `mysproj.kube.logs`'."""

from __future__ import annotations

from mysproj.kube import logs, watch
from mysproj.kube.cluster import Cluster


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("status", help="one row per stage Job of a Kubernetes run: state, start, duration, progress")
    p.add_argument("release", help="Helm release name of the run")
    p.add_argument("--namespace", "-n", default=None, help="namespace (default: the kubeconfig context's)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--watch", "-w", action="store_true", help="refresh until no stage is pending or running")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=_status)

    p = sub.add_parser("logs", help="logs of a stage's newest pod in a Kubernetes run")
    p.add_argument("release", help="Helm release name of the run")
    p.add_argument("stage", help="stage node (textures-mini/prep), stage kind (prep) or 'controller'")
    p.add_argument("--namespace", "-n", default=None)
    p.add_argument("--context", default=None)
    p.add_argument("--tail", type=int, default=None, help="last N lines only")
    p.set_defaults(func=_logs)


def _status(ns) -> int:
    return watch.show(Cluster(ns.namespace, ns.context), ns.release, watch=ns.watch, interval=ns.interval)


def _logs(ns) -> int:
    return logs.logs(Cluster(ns.namespace, ns.context), ns.release, ns.stage, tail=ns.tail)
