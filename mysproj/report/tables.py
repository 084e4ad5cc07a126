"""report.md in the paper's layout: Table 1 (F1/Acc per dataset), Table 2 (post-projection probe vs MLLM F1
with Δ%), Table 3 (pre-projection probe), the paper's value in parentheses beside each of ours (its Δ% as
printed), mean ± std over seeds, then the protocol each run followed and one provenance line per run. Pure text:
no timestamps, so the same inputs render the same file."""

from __future__ import annotations

import random
import statistics

from mysproj.config.datasets import RECORDS
from mysproj.evaluation.metrics import classification_metrics
from mysproj.report import paper as P
from mysproj.report.gather import Run, run_name
from mysproj.report.protocol import protocol_lines

TABLE1_ROWS = (  # (row name, stage, setting)
    ("CLIP zero-shot", "eval-clip", "zero-shot"),
    ("LLaVA-1.5 zero-shot", "eval-llava", "zero-shot"),
    ("LLaVA-1.5 FT-Proj", "eval-llava", "ft-projector"),
    ("LLaVA-1.5 FT-E2E", "eval-llava", "ft-full"),
    ("LLaVA-1.5 FT-LoRA", "eval-llava", "ft-lora"),
)
TABLE2_SETTINGS = ("zero-shot", "ft-projector", "ft-full", "ft-lora")


def dataset_order() -> list[str]:
    """The datasets with a paper task in the paper's task order (records in their order within a task)."""
    names = [d for d in RECORDS if P.task_of(d)]
    return sorted(names, key=lambda d: P.TASKS.index(P.task_of(d)))


def datasets_of(runs: list[Run]) -> list[str]:
    present = {r.dataset for r in runs}
    order = dataset_order()
    return [d for d in order if d in present] + sorted(present - set(order))


def values(runs: list[Run], dataset: str, stage: str, setting: str, key: str, block: str | None = None) -> list:
    out = []
    for r in runs:
        if (r.dataset, r.stage, r.setting) != (dataset, stage, setting):
            continue
        m = r.metrics.get(block, {}) if block else r.metrics
        if key in m:
            out.append(float(m[key]))
    return out


def mean(vals: list[float]) -> float | None:
    return statistics.fmean(vals) if vals else None


def cell(vals: list[float], paper: float | None = None) -> str:
    if not vals:
        text = "—"
    elif len(vals) == 1:
        text = f"{vals[0]:.4f}"
    else:
        text = f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"
    return f"{text} ({paper:.4f})" if paper is not None else text


def delta(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "—"
    return f"{(value - base) / base * 100:+.2f}%"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _task(dataset: str) -> str | None:
    return P.task_of(dataset)


def uniform_random(runs: list[Run], dataset: str, draws: int = 100, seed: int = 0) -> tuple[list, list]:
    """Our "Random (Uniform)" row: macro-F1 and accuracy of uniformly random guesses over the classes, on the
    test labels of one of the dataset's evaluations (their per-class support), averaged over seeded draws."""

    for r in runs:
        per_class = r.metrics.get("per_class") or {}
        if r.dataset != dataset or r.stage == "probe" or not per_class:
            continue
        labels = list(r.metrics["labels"])
        y_true = [c for c in labels for _ in range(int(per_class.get(c, {}).get("support", 0)))]
        if not y_true:
            continue
        rng = random.Random(seed)
        f1s, accs = [], []
        for _ in range(draws):
            m = classification_metrics(y_true, [rng.choice(labels) for _ in y_true], labels)
            f1s.append(m["macro_f1"])
            accs.append(m["accuracy"])
        return [statistics.fmean(f1s)], [statistics.fmean(accs)]
    return [], []


def table1(runs: list[Run]) -> list[str]:
    ds = datasets_of(runs)
    header = ["Model"]
    for d in ds:
        header += [f"{d} F1", f"{d} Acc"]
    lines = [_row(header), _row(["---"] * len(header))]
    for name, stage, setting in (("Random (Uniform)", None, None), *TABLE1_ROWS):
        if stage and not any(r.stage == stage and r.setting == setting for r in runs):
            continue
        cells = [name]
        for d in ds:
            ref = P.table1_value(name, d)
            ours = ([values(runs, d, stage, setting, key) for key in ("macro_f1", "accuracy")] if stage
                    else uniform_random(runs, d))
            cells += [cell(vals, ref[i] if ref else None) for i, vals in enumerate(ours)]
        lines.append(_row(cells))
    return lines


def table2(runs: list[Run]) -> list[str]:
    lines = [_row(["Dataset", "Setting", "Post-proj MLP F1", "Δ vs Original", "MLLM F1", "Δ vs Original"]),
             _row(["---"] * 6)]
    for d in datasets_of(runs):
        ref = P.TABLE2.get(_task(d), {}) if _task(d) else {}
        base_post = mean(values(runs, d, "probe", "zero-shot", "macro_f1", "post"))
        base_llm = mean(values(runs, d, "eval-llava", "zero-shot", "macro_f1"))
        ref_delta = P.TABLE2_DELTA.get(_task(d), {}) if _task(d) else {}
        first = True
        for setting in TABLE2_SETTINGS:
            post = values(runs, d, "probe", setting, "macro_f1", "post")
            llm = values(runs, d, "eval-llava", setting, "macro_f1")
            if not post and not llm:
                continue
            name = P.SETTING_NAMES[setting]
            pr = ref.get(name)
            if setting == "zero-shot":
                d_post = d_llm = "—"
            else:
                d_post, d_llm = delta(mean(post), base_post), delta(mean(llm), base_llm)
                if name in ref_delta:
                    d_post += f" ({ref_delta[name][0]})"
                    d_llm += f" ({ref_delta[name][1]})"
            lines.append(_row([d if first else "", name, cell(post, pr[0] if pr else None), d_post,
                               cell(llm, pr[1] if pr else None), d_llm]))
            first = False
    return lines


PRE_VECTORS = (("cls", "CLS pooled"), ("mean", "layer -2 patch mean"))


def pre_values(runs: list[Run], dataset: str, vector: str, key: str) -> list:
    """One pre-projection vector's values over the original model's probes: its own block (`pre_cls`,
    `pre_mean`), or an older output's single `pre` block where that run's config pooled this way."""
    out = []
    for r in runs:
        if (r.dataset, r.stage, r.setting) != (dataset, "probe", "zero-shot"):
            continue
        m = r.metrics.get(f"pre_{vector}")
        if m is None and (r.manifest.get("config") or {}).get("pre_pooling") == vector:
            m = r.metrics.get("pre")
        if m and key in m:
            out.append(float(m[key]))
    return out


def table3(runs: list[Run]) -> list[str]:
    """Both readings of the paper's "1024-d CLIP image embeddings", each beside the paper's value; the headline
    column names the one `pre_pooling` chose (the `pre` of results.parquet and the plots)."""
    header = ["Dataset"]
    for _, name in PRE_VECTORS:
        header += [f"{name} F1", f"{name} Acc"]
    lines = [_row([*header, "headline"]), _row(["---"] * (len(header) + 1))]
    for d in datasets_of(runs):
        ref = P.TABLE3.get(_task(d)) if _task(d) else None
        cells, found = [d], False
        for vector, _ in PRE_VECTORS:
            for i, key in enumerate(("macro_f1", "accuracy")):
                vals = pre_values(runs, d, vector, key)
                found = found or bool(vals)
                cells.append(cell(vals, ref[i] if ref else None))
        if not found:
            continue
        headline = sorted({str((r.manifest.get("config") or {}).get("pre_pooling", "?")) for r in runs
                           if (r.dataset, r.stage, r.setting) == (d, "probe", "zero-shot")})
        lines.append(_row([*cells, ", ".join(f"`{h}`" for h in headline)]))
    return lines


def _weights(prov: dict) -> str:
    rw = prov.get("random_weights")
    if rw is True:
        preset = f" preset {prov['preset']}" if prov.get("preset") else ""
        return f"random weights{preset}"
    if rw is False:
        return "trained weights"
    return "weights as given"


def provenance_lines(runs: list[Run]) -> list[str]:
    lines = []
    for r in runs:
        cfg = r.manifest.get("config") or {}
        prov = r.provenance
        opts = [f"{k} {cfg[k]}" for k in ("mode", "protocol", "pre_pooling") if k in cfg]
        chain = " ← ".join(prov.get("chain") or [])
        chain = f" via {chain}" if chain else ""
        lines.append(f"- `{run_name(r)}`: "
                     f"model `{cfg.get('model')}`{chain} ({_weights(prov)}); "
                     f"dataset {prov.get('prep_dataset') or r.dataset} (`{cfg.get('data')}`); "
                     f"config {r.config_hash}" + (f"; {', '.join(opts)}" if opts else ""))
    return lines


def unparsed_lines(runs: list[Run]) -> list[str]:
    lines = []
    for r in runs:
        if r.stage == "eval-llava" and "unparsed" in r.metrics:
            lines.append(f"- `{run_name(r)}`: {r.metrics['unparsed']} of {r.metrics.get('n', '?')} "
                         f"answers unparsed (counted wrong)")
    return lines


def render(runs: list[Run]) -> tuple[str, str]:
    """(report.md text, Table 1 rows as a short text block for the CLI)."""
    t1 = table1(runs)
    out = ["# Mysterious Projections: reproduction report", ""]
    if any(r.provenance.get("random_weights") for r in runs):
        out += ["> **Random weights.** At least one model below was initialised with random weights (a "
                "`model init` preset): these numbers test the pipeline, not the paper's claims.", ""]
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    out += [f"Our value first, the paper's in parentheses (arXiv 2402.16832; beside textures-mini, DTD's). "
            f"Seeds: {', '.join(map(str, seeds)) or 'none'}; with several, mean ± sample std. Random (Uniform): "
            f"uniform guesses over the classes on our test labels, mean of 100 seeded draws.", ""]
    out += ["## Table 1: macro-F1 / accuracy on the test split", "", *t1, ""]
    out += ["## Table 2: post-projection richness (MLP on mean-pooled projector output) vs MLLM macro-F1", "",
            *table2(runs), ""]
    out += ["## Table 3: pre-projection MLP (vision-tower features)", "",
            "The paper's \"1024-dimensional image embeddings obtained from a pre-trained CLIP model\" read two "
            "ways, each probed by its own MLP: CLIP's pooled output (the last layer's CLS after its post-LayerNorm) "
            "and the mean of the layer -2 patch features the projector consumes. The paper's value is beside both; "
            "`headline` is the run's `pre_pooling`.", "", *table3(runs), ""]
    unparsed = unparsed_lines(runs)
    if unparsed:
        out += ["## Unparsed LLaVA answers", "", *unparsed, ""]
    out += ["## Protocol", "", *protocol_lines(runs), ""]
    out += ["## Provenance", "", *provenance_lines(runs), ""]
    return "\n".join(out), "\n".join(t1)


def results_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        cfg = r.manifest.get("config") or {}
        blocks = ([(k, r.metrics[k]) for k in ("pre", "pre_cls", "pre_mean", "post") if k in r.metrics]
                  if r.stage == "probe" else [("", r.metrics)])
        for block, m in blocks:
            rows.append({"dataset": r.dataset, "setting": r.setting, "seed": r.seed, "stage": r.stage,
                         "block": block, "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
                         "macro_precision": m.get("macro_precision"), "macro_recall": m.get("macro_recall"),
                         "unparsed": m.get("unparsed"), "n": m.get("n"), "uri": r.uri,
                         "config_hash": r.config_hash, "model": cfg.get("model"),
                         "random_weights": r.provenance.get("random_weights"),
                         "mode": cfg.get("mode") or cfg.get("protocol")})
    return rows
