"""The report rendered from fixture stage outputs (hand-written metrics files) matches the expected text."""

import json
import os

import pytest

from mysproj.config.stages import (
    EvalClipConfig,
    EvalLlavaConfig,
    FinetuneConfig,
    MergeConfig,
    ModelInitConfig,
    PrepConfig,
    ProbeConfig,
)
from mysproj.storage.manifest import run_stage


def _metrics(acc: float, f1: float, unparsed: int = 0, n: int = 10) -> dict:
    return {"n": n, "accuracy": acc, "macro_f1": f1, "macro_precision": f1, "macro_recall": acc,
            "unparsed": unparsed, "labels": ["a", "b"], "per_class": {},
            "confusion_matrix": [[3, 2, 0], [1, 4, 0]], "confusion_columns": ["a", "b", "<unparsed>"]}


def _write(cfg, stage: str, files: dict, summary: dict | None = None) -> None:
    def body(out):
        for name, obj in files.items():
            out.write_json(name, obj)
        return summary or {}
    run_stage(stage, cfg, body)


@pytest.fixture
def run_root(tmp_path) -> str:
    root = str(tmp_path / "runs")
    j = os.path.join
    _write(ModelInitConfig(preset="tiny", out=j(root, "models/tiny")), "model-init", {"config.json": {}},
           {"random_weights": True})
    _write(ModelInitConfig(preset="clip-tiny", out=j(root, "models/clip-tiny")), "model-init", {"c.json": {}},
           {"random_weights": True})
    prep = j(root, "dtd/prep")
    _write(PrepConfig(dataset="dtd", source="/data/dtd", out=prep), "prep", {"classes.json": {}})
    base = j(root, "models/tiny")
    _write(EvalClipConfig(model="/weights/clip-vit-l-14-336", data=prep, out=j(root, "dtd/zero-shot/eval-clip")),
           "eval-clip", {"metrics.json": _metrics(0.50, 0.46)})
    _write(EvalLlavaConfig(model=base, data=prep, out=j(root, "dtd/zero-shot/eval-llava")), "eval-llava",
           {"metrics.json": _metrics(0.20, 0.10, unparsed=3)})
    for seed, (post, pre, llm) in enumerate([(0.60, 0.70, 0.40), (0.50, 0.72, 0.44)]):
        _write(ProbeConfig(model=base, data=prep, seed=seed, out=j(root, f"dtd/zero-shot/seed{seed}/probe")),
               "probe", {"metrics.json": {"pre": _metrics(pre + 0.05, pre), "pre_cls": _metrics(pre + 0.05, pre),
                                          "pre_mean": _metrics(pre - 0.1, pre - 0.2), "post": _metrics(0.8, 0.8)}})
        _write(ProbeConfig(model=base, data=prep, seed=seed, out=j(root, f"dtd/ft-projector/seed{seed}/probe")),
               "probe", {"metrics.json": {"pre": _metrics(0.7, 0.7), "post": _metrics(post, post)}})
        _write(EvalLlavaConfig(model=base, data=prep, out=j(root, f"dtd/ft-projector/seed{seed}/eval-llava")),
               "eval-llava", {"metrics.json": _metrics(llm + 0.01, llm)})
    return root


EXPECTED_TABLE1 = """\
| Model | dtd F1 | dtd Acc |
| --- | --- | --- |
| Random (Uniform) | — (0.0214) | — (0.0218) |
| CLIP zero-shot | 0.4600 (0.4582) | 0.5000 (0.4984) |
| LLaVA-1.5 zero-shot | 0.1000 (0.1882) | 0.2000 (0.2138) |
| LLaVA-1.5 FT-Proj | 0.4200 ± 0.0283 (0.4505) | 0.4300 ± 0.0283 (0.4654) |"""

EXPECTED_TABLE2 = """\
| Dataset | Setting | Post-proj MLP F1 | Δ vs Original | MLLM F1 | Δ vs Original |
| --- | --- | --- | --- | --- | --- |
| dtd | Original | 0.8000 ± 0.0000 (0.6401) | — | 0.1000 (0.1882) | — |
|  | FT-Proj | 0.5500 ± 0.0707 (0.4736) | -31.25% (-26.01%) | 0.4200 ± 0.0283 (0.4505) | +320.00% (+139.37%) |"""

EXPECTED_TABLE3 = """\
| Dataset | CLS pooled F1 | CLS pooled Acc | layer -2 patch mean F1 | layer -2 patch mean Acc | headline |
| --- | --- | --- | --- | --- | --- |
| dtd | 0.7100 ± 0.0141 (0.7644) | 0.7600 ± 0.0141 (0.7638) | 0.5100 ± 0.0141 (0.7644) | \
0.6100 ± 0.0141 (0.7638) | `cls` |"""


def test_report_tables_match_expected_text(run_root, tmp_path):
    from mysproj.config.stages import ReportConfig
    from mysproj.stages import report

    out = str(tmp_path / "report")
    manifest = report.run(ReportConfig(runs=[run_root], out=out))
    text = open(os.path.join(out, "report.md")).read()
    assert EXPECTED_TABLE1 in text
    assert EXPECTED_TABLE2 in text
    assert EXPECTED_TABLE3 in text
    assert manifest["summary"]["table1_rows"] == EXPECTED_TABLE1
    assert "Random weights" in text  # the LLaVA runs come from a model-init output
    assert "- `dtd/zero-shot/eval-llava`: 3 of 10 answers unparsed (counted wrong)" in text
    prov = [ln for ln in text.splitlines() if ln.startswith("- `dtd/ft-projector/seed1/eval-llava`: model")]
    assert len(prov) == 1 and "random weights preset tiny" in prov[0] and "mode generate" in prov[0]
    clip_prov = [ln for ln in text.splitlines() if ln.startswith("- `dtd/zero-shot/eval-clip`: model")][0]
    assert "weights as given" in clip_prov and "dataset dtd" in clip_prov


def test_report_outputs_parquet_and_plots(run_root, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("matplotlib")
    from mysproj.config.stages import ReportConfig
    from mysproj.stages import report

    out = str(tmp_path / "report")
    manifest = report.run(ReportConfig(runs=[run_root], out=out))
    rows = pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
    # 1 clip + 1 zero-shot llava + 2 ft llava + 2 zero-shot probes x (pre, pre_cls, pre_mean, post) + 2 x (pre, post)
    assert len(rows) == 1 + 1 + 2 + 2 * 4 + 2 * 2
    assert sorted(r["macro_f1"] for r in rows if r["block"] == "pre_mean") == pytest.approx([0.5, 0.52])
    probe_post = [r for r in rows if r["stage"] == "probe" and r["block"] == "post" and r["setting"] == "ft-projector"]
    assert sorted(r["macro_f1"] for r in probe_post) == [0.5, 0.6]
    plots = [n for n in manifest["files"] if n.startswith("plots/")]
    assert {"plots/f1_per_setting.png", "plots/richness.png"} <= set(plots)
    assert any(n.startswith("plots/confusion_dtd_zero-shot_eval-llava") for n in plots)
    with open(os.path.join(out, "plots/richness.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table3_reads_an_older_probe_by_its_pooling(tmp_path):
    """An output from before both vectors were probed has one `pre` block: it lands in its own pooling's column."""
    from mysproj.report.gather import gather
    from mysproj.report.tables import table3

    root = str(tmp_path / "runs")
    prep = os.path.join(root, "dtd/prep")
    _write(PrepConfig(dataset="dtd", source="/data/dtd", out=prep), "prep", {"classes.json": {}})
    _write(ProbeConfig(model="/m", data=prep, pre_pooling="mean", out=os.path.join(root, "dtd/zero-shot/seed0/probe")),
           "probe", {"metrics.json": {"pre": _metrics(0.3, 0.25), "post": _metrics(0.8, 0.8)}})
    row = table3(gather([root]))[2]
    assert row == "| dtd | — (0.7644) | — (0.7638) | 0.2500 (0.7644) | 0.3000 (0.7638) | `mean` |"


def test_report_accepts_a_single_stage_output(run_root, tmp_path):
    from mysproj.config.stages import ReportConfig
    from mysproj.stages import report

    out = str(tmp_path / "report")
    report.run(ReportConfig(runs=[os.path.join(run_root, "dtd/zero-shot/eval-clip")], out=out))
    text = open(os.path.join(out, "report.md")).read()
    assert "| CLIP zero-shot | 0.4600 (0.4582) | 0.5000 (0.4984) |" in text
    assert "LLaVA-1.5 zero-shot" not in text


def test_report_without_runs_is_bad_input(tmp_path):
    from mysproj.config.stages import ReportConfig
    from mysproj.errors import BadInput
    from mysproj.stages import report

    with pytest.raises(BadInput, match="no finished"):
        report.run(ReportConfig(runs=[str(tmp_path / "empty")], out=str(tmp_path / "r")))


def test_paper_deltas_are_the_printed_values():
    """The paper's Δ columns as printed, not recomputed from its rounded F1s (-29.73% for Dermatology FT-Proj)."""
    from mysproj.report.gather import Run
    from mysproj.report.tables import table2

    def run(setting, stage, metrics):
        return Run(dataset="dermnet", setting=setting, seed=0, stage=stage, uri="x", manifest={}, metrics=metrics)

    runs = [run(setting, "probe", {"post": _metrics(0.5, f1)}) for setting, f1 in (("zero-shot", 0.3),
                                                                                   ("ft-projector", 0.2))]
    runs += [run(setting, "eval-llava", _metrics(0.1, f1)) for setting, f1 in (("zero-shot", 0.1),
                                                                               ("ft-projector", 0.3))]
    line = next(ln for ln in table2(runs) if "FT-Proj" in ln)
    assert "-33.33% (-29.72%)" in line and "+200.00% (+345.59%)" in line


@pytest.fixture
def recipe_root(tmp_path) -> str:
    """dtd run as the released scripts, dermnet as the paper's text with an older fine-tune that clipped."""
    root = str(tmp_path / "runs")
    j = os.path.join
    base = j(root, "models/tiny")
    _write(ModelInitConfig(preset="tiny", out=base), "model-init", {"config.json": {}}, {"random_weights": True})
    for ds, released in (("dtd", True), ("dermnet", False)):
        prep = j(root, ds, "prep")
        extra = dict(prompt_style="code", label_underscores="delete") if released else {}
        _write(PrepConfig(dataset=ds, source="/data", out=prep, **extra), "prep", {"classes.json": {}})
        ft = j(root, ds, "ft-projector/seed0/finetune")
        extra = dict(conv="plain", image_aspect_ratio="square", image_backend="pil", max_micro_batch=32,
                     fill="repeat") if released \
            else dict(max_grad_norm=1.0)
        _write(FinetuneConfig(model=base, data=prep, out=ft, **extra), "finetune", {"m.json": {}})
        merged = j(root, ds, "ft-projector/seed0/merge")
        _write(MergeConfig(base=base, projector=ft, out=merged), "merge", {"config.json": {}})
        extra = dict(temperature=0.2, max_new_tokens=512, image_backend="pil") if released else {}
        decoding = "sampled at temperature 0.2, seed 0, at most 512 new tokens, stop at a line break"
        _write(EvalLlavaConfig(model=merged, data=prep, out=j(root, ds, "ft-projector/seed0/eval-llava"), **extra),
               "eval-llava", {"metrics.json": {**_metrics(0.4, 0.4), **({"decoding": decoding} if released else {})}})
        extra = dict(protocol="code", image_backend="pil") if released else {}
        _write(ProbeConfig(model=base, data=prep, out=j(root, ds, "zero-shot/seed0/probe"), **extra), "probe",
               {"metrics.json": {"pre": _metrics(0.7, 0.7), "pre_cls": _metrics(0.7, 0.7),
                                 "pre_mean": _metrics(0.6, 0.6), "post": _metrics(0.8, 0.8)}})
    _write(EvalClipConfig(model="/clip", data=j(root, "dtd", "prep"), out=j(root, "dtd/zero-shot/eval-clip")),
           "eval-clip", {"metrics.json": _metrics(0.50, 0.46)})
    return root


def test_report_names_the_protocol_of_every_run(recipe_root, tmp_path):
    from mysproj.config.stages import ReportConfig
    from mysproj.stages import report

    out = str(tmp_path / "report")
    report.run(ReportConfig(runs=[recipe_root], out=out))
    text = open(os.path.join(out, "report.md")).read()
    section = text[text.index("## Protocol"):text.index("## Provenance")]
    lines = {ln.split("`")[1]: ln for ln in section.splitlines() if ln.startswith("- `")}
    assert set(lines) == {"dtd/ft-projector/seed0/eval-llava", "dtd/zero-shot/seed0/probe", "dtd/zero-shot/eval-clip",
                          "dermnet/ft-projector/seed0/eval-llava", "dermnet/zero-shot/seed0/probe"}
    assert lines["dtd/ft-projector/seed0/eval-llava"].endswith(
        ": recipe released; prompt ending `code` (paper's text: `paper`); label rule `delete` (paper's text: "
        "`space`); conversation `plain` (paper's text: `v1`); training images `square` (paper's text: `pad`); "
        "micro-batch cap `32` (paper's text: `16`); last step `repeat` (paper's text: `masked`); "
        "training image processor `pil` (paper's text: `torchvision`); image processor `pil` (paper's text: "
        "`torchvision`); "
        "decoding temperature `0.2` (paper's text: `0.0`); max new tokens `512` (paper's text: `32`). Ran: sampled "
        "at temperature 0.2, seed 0, at most 512 new tokens, stop at a line break.")
    assert lines["dtd/zero-shot/seed0/probe"].endswith(
        ": recipe released; probe protocol `code` (paper's text: `paper`); image processor `pil` (paper's text: "
        "`torchvision`). Ran: both pre-projection vectors (CLS "
        "pooled, layer -2 patch mean), headline `cls`.")
    assert lines["dtd/zero-shot/eval-clip"].endswith(": recipe released; label rule `delete` (paper's text: `space`)")
    assert lines["dermnet/ft-projector/seed0/eval-llava"].endswith(
        ": recipe mixed; gradient clipping `1.0` (paper's text: `0.0`)")
    assert lines["dermnet/zero-shot/seed0/probe"].endswith(": recipe paper; nothing departs from the paper's text. "
                                                           "Ran: both pre-projection vectors (CLS pooled, layer -2 "
                                                           "patch mean), headline `cls`.")


def test_uniform_random_row_is_chance_level():
    from mysproj.report.gather import Run
    from mysproj.report.tables import uniform_random

    labels = [f"c{i}" for i in range(5)]
    metrics = {"labels": labels, "per_class": {c: {"support": 40} for c in labels}}
    run = Run(dataset="dtd", setting="zero-shot", seed=None, stage="eval-clip", uri="x", manifest={},
              metrics=metrics)
    f1, acc = uniform_random([run], "dtd")
    assert acc[0] == pytest.approx(0.2, abs=0.02)
    assert f1[0] == pytest.approx(0.2, abs=0.03)
    assert uniform_random([run], "plantdoc") == ([], [])


def test_report_has_loss_curves_and_a_line_per_fine_tuning(run_root, tmp_path):
    pytest.importorskip("matplotlib")
    from mysproj.config.stages import ReportConfig
    from mysproj.stages import report

    base, prep = os.path.join(run_root, "models/tiny"), os.path.join(run_root, "dtd/prep")
    for seed, losses in enumerate([(2.5, 1.75, 1.0), (2.25, 1.5, 0.875)]):
        out = os.path.join(run_root, f"dtd/ft-projector/seed{seed}/finetune")

        def body(o, losses=losses):
            o.write_text("metrics.jsonl", "".join(json.dumps({"step": 10 * (i + 1), "total": 30, "loss": v}) + "\n"
                                                  for i, v in enumerate(losses)))
            return {"steps": 30, "final_loss": losses[-1]}

        run_stage("finetune", FinetuneConfig(model=base, data=prep, seed=seed, out=out), body)
    out = str(tmp_path / "report")
    manifest = report.run(ReportConfig(runs=[run_root], out=out))
    text = open(os.path.join(out, "report.md")).read()
    assert "## Training" in text
    assert "- `dtd/ft-projector/seed0/finetune`: projector, 30 steps, final loss 1.0000" in text
    assert "- `dtd/ft-projector/seed1/finetune`: projector, 30 steps, final loss 0.8750" in text
    assert "plots/loss_dtd.png" in manifest["files"]
    with open(os.path.join(out, "plots/loss_dtd.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from mysproj.report.training import trainings

    curves = {t.seed: t.curve for t in trainings([run_root])}
    assert curves[1] == [(10, 2.25), (20, 1.5), (30, 0.875)]
