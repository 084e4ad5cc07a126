import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from _eval_fixtures import clip_tiny_uri, prep_uri, run_stage_cfg  # noqa: E402,F401

pq = pytest.importorskip("pyarrow.parquet")


@pytest.mark.parametrize("protocol", ["paper", "openclip"])
def test_eval_clip_end_to_end(tmp_path, prep_uri, clip_tiny_uri, protocol):  # noqa: F811
    out = str(tmp_path / "eval-clip")
    m = run_stage_cfg("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, protocol=protocol, workers=0,
                      batch_size=5)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    assert metrics["n"] == len(rows) == 16
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion_matrix",
                "labels", "unparsed"):
        assert key in metrics
    assert metrics["unparsed"] == 0
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert {r["prediction"] for r in rows} <= set(metrics["candidates"])
    assert all(abs(sum(r["scores"]) - 1) < 1e-3 for r in rows)
    assert m["summary"]["n"] == 16
    # a second run with the same config is skipped
    assert run_stage_cfg("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, protocol=protocol,
                         workers=0, batch_size=5).get("skipped")


def test_paper_protocol_is_argmax_over_photo_template(tmp_path, prep_uri, clip_tiny_uri):  # noqa: F811
    """Recompute the seed script's prediction one image at a time, the slow way, and compare."""
    from mysproj.data.prepared import PreparedData
    from mysproj.models.clip import load_clip

    out = str(tmp_path / "eval-clip")
    run_stage_cfg("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, workers=0, batch_size=7)
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    data = PreparedData(prep_uri)
    model, preprocess, tokenizer = load_clip(clip_tiny_uri)
    labels = list(data.classes)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"This is a photo of {c.lower()}." for c in labels]), normalize=True)
        for row, s in zip(rows, data.samples("test")):
            img = model.encode_image(preprocess(data.open_image(s))[None], normalize=True)
            assert row["prediction"] == labels[int((img @ text.T).argmax())]


def test_hf_clip_layout(tmp_path, prep_uri):  # noqa: F811
    """An HF `CLIPModel` folder runs through transformers; predictions equal CLIPModel's own logits."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mysproj.data.prepared import PreparedData
    from mysproj.models.clip import load_clip

    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=16)
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf-clip"
    CLIPModel(cfg).save_pretrained(hf_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(hf_dir)
    clip = load_clip(str(hf_dir))
    assert clip.kind == "hf"

    out = str(tmp_path / "eval")
    run_stage_cfg("eval-clip", model=str(hf_dir), data=prep_uri, out=out, workers=0)
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    data = PreparedData(prep_uri)
    ref = CLIPModel.from_pretrained(hf_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(hf_dir)
    tokens = clip.tokenizer([f"This is a photo of {c.lower()}." for c in data.classes])
    images = [data.open_image(s) for s in data.samples("test")]
    with torch.no_grad():
        logits = ref(input_ids=tokens, pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    want = [data.classes[int(i)] for i in logits.logits_per_image.argmax(dim=-1)]
    assert [r["prediction"] for r in rows] == want


def test_clip_tiny_preset_output(clip_tiny_uri):  # noqa: F811
    from mysproj.models.clip import TINY_MODEL_CFG, load_clip
    from mysproj.storage.manifest import StageInput

    out = StageInput(clip_tiny_uri, expect_stage="model-init")
    assert {"open_clip_config.json", "open_clip_model.safetensors", "mysproj_clip.json"} <= set(out.files)
    assert out.manifest["summary"]["random_weights"] is True
    assert out.read_json("open_clip_config.json")["model_cfg"] == TINY_MODEL_CFG
    clip = load_clip(clip_tiny_uri)
    # the real open_clip BPE tokenizer: start/end-of-text ids of CLIP's 49,408-token vocabulary
    tokens = clip.tokenizer(["a photo of a brick wall."])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406 and 49407 in tokens[0].tolist()


def test_unrecognised_clip_folder_is_bad_input(tmp_path):
    from mysproj.errors import BadInput
    from mysproj.models.clip import load_clip

    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(BadInput, match="expected open_clip_config.json"):
        load_clip(str(tmp_path))
