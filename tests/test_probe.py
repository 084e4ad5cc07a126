import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")

from stage_runs import stage  # noqa: E402


def test_probe_end_to_end(tmp_path, prep_uri, llava_tiny_uri):
    from safetensors.torch import load_file

    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import pixel_values
    from mysproj.models.loading import load_llava

    out = str(tmp_path / "probe")
    m = stage("probe", model=llava_tiny_uri, data=prep_uri, out=out, protocol="code", max_epochs=2,
                      workers=0, batch_size=5)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for kind in ("pre", "pre_cls", "pre_mean", "post"):
        for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion_matrix",
                    "labels", "unparsed", "n"):
            assert key in metrics[kind]
        assert metrics[kind]["n"] == 16 and metrics[kind]["training"]["epochs"] == 2
    assert set(m["summary"]) >= {"pre_macro_f1", "post_macro_f1", "pre_cls_macro_f1", "pre_mean_macro_f1"}
    # both pre-projection vectors get their own MLP; the headline `pre` is the CLS one by default (A.3)
    assert metrics["pre_pooling"] == "cls" and metrics["pre"]["vector"] == "cls"
    assert metrics["pre"]["macro_f1"] == metrics["pre_cls"]["macro_f1"]
    assert metrics["pre_cls"]["feature_dim"] == metrics["pre_mean"]["feature_dim"]

    # stored features are what the vision tower and projector give, recomputed here the direct way
    loaded = load_llava(llava_tiny_uri)
    model, cfg = loaded.model, loaded.model.config
    data = PreparedData(prep_uri)
    test = data.samples("test")
    feats = load_file(os.path.join(out, "features/test.safetensors"))
    index = pq.read_table(os.path.join(out, "features/test.parquet")).to_pylist()
    assert [r["image"] for r in index] == [s.image for s in test]
    assert feats["label_id"].tolist() == [s.label_id for s in test]
    pix = pixel_values([data.open_image(s) for s in test], loaded.image_processor)
    with torch.no_grad():
        hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        patches = hidden[:, 1:]
        post = model.model.multi_modal_projector(patches).mean(dim=1)
        pooled = model.model.vision_tower(pix).pooler_output
    assert feats["pre_mean"].shape == feats["pre_cls"].shape == (16, cfg.vision_config.hidden_size)
    assert feats["post"].shape == (16, cfg.text_config.hidden_size)
    torch.testing.assert_close(feats["pre_mean"], patches.mean(dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats["pre_cls"], pooled, atol=1e-5, rtol=1e-4)
    assert torch.equal(feats["pre"], feats["pre_cls"])
    torch.testing.assert_close(feats["post"], post, atol=1e-5, rtol=1e-4)


def test_cls_pooling_is_clip_pooler_output(prep_uri, llava_tiny_uri):
    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import pixel_values
    from mysproj.models.loading import load_llava
    from mysproj.stages.probe import image_features

    loaded = load_llava(llava_tiny_uri)
    data = PreparedData(prep_uri)
    pix = pixel_values([data.open_image(s) for s in data.samples("test")[:3]], loaded.image_processor)
    pre, _ = image_features(loaded.model, pix, "cls")
    with torch.no_grad():
        want = loaded.model.model.vision_tower(pix).pooler_output
    torch.testing.assert_close(pre, want, atol=1e-5, rtol=1e-4)
