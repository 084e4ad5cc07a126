import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from mysproj.evaluation.probe_mlp import build_mlp, train_probe  # noqa: E402


def _linear_shapes(model):
    return [(m.in_features, m.out_features) for m in model if isinstance(m, torch.nn.Linear)]


def test_pre_mlp_is_the_papers_shape():
    m = build_mlp("pre", 1024, 47)
    assert _linear_shapes(m) == [(1024, 2000), (2000, 3600), (3600, 1024), (1024, 600), (600, 256), (256, 47)]
    assert [type(x).__name__ for x in m] == ["Linear", "ReLU"] * 5 + ["Linear"]


def test_post_mlp_is_the_papers_shape():
    m = build_mlp("post", 4096, 4)
    assert _linear_shapes(m) == [(4096, 2048), (2048, 1536), (1536, 1024), (1024, 512), (512, 256), (256, 4)]
    assert [type(x).__name__ for x in m] == ["Linear", "ReLU"] * 5 + ["Linear"]


def _blobs(n_per_class=12, classes=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 0.5, (n_per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype("float32"), y


def test_code_protocol_runs_exactly_max_epochs_and_learns():
    x, y = _blobs()
    model, hist = train_probe("post", x, y, 3, protocol="code", max_epochs=4, seed=0)
    assert hist["epochs"] == 4 and hist["n_val"] == 0 and hist["lr"] == 1e-3 and hist["batch_size"] == 32
    with torch.no_grad():
        acc = (model(torch.tensor(x)).argmax(-1).numpy() == y).mean()
    assert acc > 0.9


def test_paper_protocol_stops_early_on_validation_loss():
    x, y = _blobs()
    y_noise = np.random.default_rng(1).integers(0, 3, len(y))  # unlearnable labels: validation loss stops improving
    _, hist = train_probe("post", x, y_noise, 3, protocol="paper", max_epochs=60, patience=2, seed=0,
                          val_fraction=0.25)
    assert hist["lr"] == 1e-4 and hist["batch_size"] == 128
    assert hist["n_val"] == 9 and hist["n_train"] == 27
    assert hist["epochs"] < 60
    assert hist["epochs"] == hist["best_epoch"] + 2  # stopped after `patience` epochs without improvement
    assert len(hist["val_loss"]) == hist["epochs"]


def test_training_is_seeded():
    x, y = _blobs()
    a, ha = train_probe("post", x, y, 3, protocol="code", max_epochs=2, seed=3)
    b, hb = train_probe("post", x, y, 3, protocol="code", max_epochs=2, seed=3)
    assert ha["train_loss"] == hb["train_loss"]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
