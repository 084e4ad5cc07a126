"""The `helm` side of `mysproj reproduce`: the values file, its `reproduce.tolerance`, a release name, and `helm`
itself (from PATH, an argument list, no shell)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess  # nosec B404 - runs helm with an argv list
from datetime import datetime, timezone
from pathlib import Path

import yaml

from mysproj.errors import BadInput
from mysproj.report.comparison import DEFAULT_TOLERANCE

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHART = REPO / "charts" / "mysproj"
_RELEASE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?$")


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


def release_tolerance(values: dict, chart: Path, override: float | None) -> float:
    """The tolerance a release of `chart` with `values` compares under: the values file's `reproduce` block over
    the chart's defaults, or `override`."""
    defaults = yaml.safe_load((chart / "values.yaml").read_text()) if (chart / "values.yaml").is_file() else {}
    block = {**((defaults or {}).get("reproduce") or {}), **(values.get("reproduce") or {})} \
        if isinstance(values.get("reproduce", {}), dict) else values["reproduce"]
    return tolerance_of({"reproduce": block}, override)


def default_release(dataset: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"repro-{dataset.replace('_', '-')[:20]}-{stamp}".lower()


def check_release(release: str) -> str:
    if not _RELEASE.match(release):
        raise BadInput(f"release name {release!r}: lowercase letters, digits and '-', at most 53 characters")
    return release


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
