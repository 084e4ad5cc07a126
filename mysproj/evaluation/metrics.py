"""The one metrics module every eval and probe uses: sklearn's semantics (macro averages with
zero_division=0, as the released code's CLIP script computes them), written as the `metrics.json` block.

A prediction of `None` (or any string outside `labels`) is an unparsed answer: it counts as wrong for every
class, is tallied in `unparsed`, and gets its own confusion-matrix column so nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNPARSED = "<unparsed>"


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """accuracy, macro F1/precision/recall, per-class scores, the confusion matrix (rows = true label in
    `labels` order; columns = predicted label, plus a last `<unparsed>` column) and the unparsed count.

    Macro averages run over the classes that occur in `y_true` or among the parsed predictions -- sklearn's
    default label set (`labels=None`), so a class absent from the test split and never predicted (PlantDoc's
    train-only class) does not add a zero -- i.e. `sklearn.metrics.f1_score(y_true, y_pred, labels=active,
    average='macro', zero_division=0)`. Unparsed answers are misses for recall, never a class of their own."""

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    labels = list(labels)
    index = {c: i for i, c in enumerate(labels)}
    k = len(labels)
    cm = np.zeros((k, k + 1), dtype=np.int64)
    unparsed = 0
    for t, p in zip(y_true, y_pred):
        if t not in index:
            raise ValueError(f"true label {t!r} is not one of the {k} classes")
        if p is None or p not in index:
            unparsed += 1
            cm[index[t], k] += 1
        else:
            cm[index[t], index[p]] += 1
    n = len(y_true)
    tp = np.diag(cm[:, :k]).astype(float)
    support = cm.sum(axis=1).astype(float)          # true count per class
    predicted = cm[:, :k].sum(axis=0).astype(float)  # predicted count per class
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    active = (support > 0) | (predicted > 0)
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, c in enumerate(labels)}
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[active].mean()) if active.any() else 0.0,
        "macro_precision": float(precision[active].mean()) if active.any() else 0.0,
        "macro_recall": float(recall[active].mean()) if active.any() else 0.0,
        "unparsed": unparsed,
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_columns": [*labels, UNPARSED],
    }


def short(metrics: dict) -> str:
    """One log line: the headline numbers to 4 dp, as the released script prints them."""
    return (f"n={metrics['n']} acc={metrics['accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f} "
            f"P={metrics['macro_precision']:.4f} R={metrics['macro_recall']:.4f} unparsed={metrics['unparsed']}")
