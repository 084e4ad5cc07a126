import random

import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from mysproj.evaluation.metrics import UNPARSED, classification_metrics  # noqa: E402


def _sklearn(y_true, y_pred, labels):
    # The module's documented semantics: sklearn over the classes seen in y_true or among parsed predictions;
    # unparsed answers enter sklearn as a label outside that set (a miss, never a class).
    active = sorted(set(y_true) | {p for p in y_pred if p in labels})
    pred = [p if p in labels else "__none__" for p in y_pred]
    kw = dict(labels=active, average="macro", zero_division=0)
    return {
        "accuracy": sklearn_metrics.accuracy_score(y_true, pred),
        "macro_f1": sklearn_metrics.f1_score(y_true, pred, **kw),
        "macro_precision": sklearn_metrics.precision_score(y_true, pred, **kw),
        "macro_recall": sklearn_metrics.recall_score(y_true, pred, **kw),
    }


@pytest.mark.parametrize("seed", range(8))
def test_matches_sklearn_on_random_labels(seed):
    rng = random.Random(seed)
    labels = [f"class {i}" for i in range(rng.randint(2, 9))]
    n = rng.randint(1, 200)
    y_true = [rng.choice(labels[:-1]) for _ in range(n)]  # the last class may occur only in predictions
    y_pred = [None if rng.random() < 0.15 else rng.choice(labels) for _ in range(n)]
    got = classification_metrics(y_true, y_pred, labels)
    want = _sklearn(y_true, y_pred, labels)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["unparsed"] == sum(p is None for p in y_pred)
    assert got["n"] == n


def test_plain_sklearn_default_when_everything_parses():
    rng = random.Random(42)
    labels = ["a", "b", "c", "d"]
    y_true = [rng.choice(labels) for _ in range(100)]
    y_pred = [rng.choice(labels) for _ in range(100)]
    got = classification_metrics(y_true, y_pred, labels)
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    per = sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert [got["per_class"][c]["f1"] for c in labels] == pytest.approx(list(per))


def test_confusion_matrix_counts_unparsed_in_its_own_column():
    m = classification_metrics(["a", "a", "b", "b"], ["a", None, "a", "b"], ["a", "b", "c"])
    assert m["confusion_columns"] == ["a", "b", "c", UNPARSED]
    assert m["confusion_matrix"] == [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == 0.5
    assert m["unparsed"] == 1
    # class "c" neither occurs nor is predicted: it must not drag the macro average down
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["support"] == 0


def test_unknown_true_label_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        classification_metrics(["x"], ["a"], ["a", "b"])
