"""`mysproj reproduce`'s pieces that need no cluster: the comparison with the paper's Table 1
(`mysproj.report.comparison`), the tolerance from the values file, seeds and helm arguments (`mysproj.kube.helm`).
The whole command runs against the real control plane in tests/kube/test_faults.py (through `make reproduce`)."""

from __future__ import annotations

import pytest

from mysproj.commands import reproduce as R
from mysproj.errors import BadInput
from mysproj.kube import helm as H
from mysproj.report import comparison as C
from mysproj.report import paper as P


def _row(stage, setting, f1, acc, seed=None, random_weights=False, dataset="dtd"):
    return {"dataset": dataset, "setting": setting, "seed": seed, "stage": stage, "block": "", "macro_f1": f1,
            "accuracy": acc, "random_weights": random_weights}


def test_compare_means_seeds_and_uses_the_papers_numbers():
    ft = P.TABLE1["LLaVA-1.5 FT-Proj"]["Textures"]
    rows = [_row("eval-clip", "zero-shot", 0.4582, 0.4984),
            _row("eval-llava", "ft-projector", ft[0] - 0.004, ft[1], seed=0),
            _row("eval-llava", "ft-projector", ft[0] + 0.002, ft[1] + 0.03, seed=1),
            _row("probe", "zero-shot", 0.9, 0.9) | {"block": "pre"},          # not a Table 1 row
            _row("eval-clip", "zero-shot", 0.1, 0.1, dataset="plantdoc")]    # another dataset
    checks = C.compare(rows, "dtd", 0.01)
    got = {(c.row, c.metric): c for c in checks}
    assert set(got) == {("CLIP zero-shot", "F1"), ("CLIP zero-shot", "Acc"), ("LLaVA-1.5 FT-Proj", "F1"),
                        ("LLaVA-1.5 FT-Proj", "Acc")}
    f1 = got[("LLaVA-1.5 FT-Proj", "F1")]
    assert f1.seeds == 2 and f1.ours == pytest.approx(ft[0] - 0.001) and f1.within
    acc = got[("LLaVA-1.5 FT-Proj", "Acc")]
    assert acc.delta == pytest.approx(0.015) and acc.within is False
    matched, line = C.verdict(checks, random_weights=False)
    assert matched is False and "1 of 4 metrics outside ±0.01" in line and "FT-Proj Acc" in line
    assert C.verdict(C.compare(rows, "dtd", 0.02), random_weights=False)[0] is True
    assert "Δ" in C.render_checks(checks) and "NO" in C.render_checks(checks)


def test_random_weights_are_reported_not_enforced_and_unknown_datasets_do_not_pass():
    rows = [_row("eval-clip", "zero-shot", 0.02, 0.03, random_weights=True)]
    matched, line = C.verdict(C.compare(rows, "dtd", 0.01), random_weights=True)
    assert matched is True and "not enforced" in line and "0 of 2" in line
    rows = [_row("eval-clip", "zero-shot", 0.5, 0.5, dataset="imagefolder")]
    checks = C.compare(rows, "imagefolder", 0.01)
    assert checks and all(c.within is None for c in checks)
    assert C.verdict(checks, random_weights=False)[0] is False


def test_tolerance_seeds_values_and_helm_arguments(tmp_path):
    assert H.tolerance_of({}, None) == C.DEFAULT_TOLERANCE
    assert H.tolerance_of({"reproduce": {"tolerance": 0.05}}, None) == 0.05
    assert H.tolerance_of({"reproduce": {"tolerance": 0.05}}, 0.2) == 0.2
    for bad in ({"reproduce": {"tolerance": "lots"}}, {"reproduce": {"tolerance": 2}}, {"reproduce": 3}):
        with pytest.raises(BadInput, match="reproduce"):
            H.tolerance_of(bad, None)
    assert R.parse_seeds("0, 1,2") == [0, 1, 2] and R.parse_seeds("") is None
    for bad in ("a", "1,1", "-1"):
        with pytest.raises(BadInput, match="--seeds"):
            R.parse_seeds(bad)
    with pytest.raises(BadInput, match="values-nope.yaml not found.*values-dtd.yaml"):
        H.values_file("nope", None, H.DEFAULT_CHART)
    assert H.values_file("dtd", None, H.DEFAULT_CHART).name == "values-dtd.yaml"
    release = H.default_release("dtd")
    assert H._RELEASE.match(release) and release.startswith("repro-dtd-")
    args = H.helm_args("r1", H.DEFAULT_CHART, tmp_path / "v.yaml", "ns", "dtd", [0, 1], ["a.b=c"], None)
    assert args[:2] == ["install", "r1"] and "pipeline.datasets=[\"dtd\"]" in args and "pipeline.seeds=[0, 1]" in args
    assert args[args.index("--set") + 1] == "a.b=c" and args[args.index("--namespace") + 1] == "ns"
    with pytest.raises(BadInput, match="key=value"):
        H.helm_args("r1", H.DEFAULT_CHART, tmp_path / "v.yaml", None, "dtd", None, ["novalue"], None)
