import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from photo_files import jpeg, photos  # noqa: E402
from stage_runs import stage  # noqa: E402

pq = pytest.importorskip("pyarrow.parquet")


@pytest.mark.parametrize("protocol", ["paper", "openclip"])
def test_eval_clip_end_to_end(tmp_path, prep_uri, clip_tiny_uri, protocol):
    out = str(tmp_path / "eval-clip")
    m = stage("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, protocol=protocol, workers=0,
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
    assert stage("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, protocol=protocol,
                         workers=0, batch_size=5).get("skipped")


def test_paper_protocol_is_argmax_over_photo_template(tmp_path, prep_uri, clip_tiny_uri):
    """Recompute the released script's prediction one image at a time, the slow way, and compare."""
    from mysproj.data.prepared import PreparedData
    from mysproj.models.clip import load_clip

    out = str(tmp_path / "eval-clip")
    stage("eval-clip", model=clip_tiny_uri, data=prep_uri, out=out, workers=0, batch_size=7)
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    data = PreparedData(prep_uri)
    model, preprocess, tokenizer = load_clip(clip_tiny_uri)
    labels = list(data.classes)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"This is a photo of {c.lower()}." for c in labels]), normalize=True)
        for row, s in zip(rows, data.samples("test")):
            img = model.encode_image(preprocess(data.open_image(s))[None], normalize=True)
            assert row["prediction"] == labels[int((img @ text.T).argmax())]


def test_hf_clip_layout(tmp_path, prep_uri):
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
    stage("eval-clip", model=str(hf_dir), data=prep_uri, out=out, workers=0)
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


def test_clip_tiny_preset_output(clip_tiny_uri):
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


# ------------------------------------------------------------------ decode=device, precision=bf16, compile

def _pil_vs_tensor(raw: bytes, preprocess, spec):
    """(PIL path pixels, tensor path pixels) of one file, both [3, S, S] normalised."""
    from mysproj.data.images import open_rgb
    from mysproj.evaluation.device_decode import decode_jpegs, preprocess_decoded

    (decoded,) = decode_jpegs([torch.frombuffer(bytearray(raw), dtype=torch.uint8)], "cpu")
    return preprocess(open_rgb(raw)), preprocess_decoded([decoded], spec)[0]


@pytest.mark.parametrize("size", [336, 64])  # ViT-L-14-336's input and the tiny preset's (a 5-10x reduction)
def test_tensor_preprocessing_matches_pil_on_photos(size):
    """Real photos as JPEGs of several sizes and aspects: the tensor path's pixels equal open_clip's PIL
    transform's to within rounding. Measured: mean |diff| <= 0.004 and max 1 on the 0-255 scale (one 2-D float
    resample instead of PIL's two rounded passes gives ~0.15 mean, up to 6)."""
    from open_clip.transform import image_transform

    from mysproj.evaluation.device_decode import pixel_spec

    preprocess = image_transform(size, is_train=False)
    spec = pixel_spec(preprocess)
    assert (spec.resize, spec.crop, spec.mode) == (size, (size, size), "bicubic")
    scale = torch.tensor(spec.std)[:, None, None] * 255  # normalised units -> 0-255 levels
    sizes = [(500, 375), (375, 500), (640, 480), (300, 300), (1024, 700), (200, 150)]
    worst_mean = worst_max = 0.0
    for photo in photos().values():
        for wh in sizes:
            want, got = _pil_vs_tensor(jpeg(photo, wh), preprocess, spec)
            diff = ((got - want) * scale).abs()
            worst_mean, worst_max = max(worst_mean, float(diff.mean())), max(worst_max, float(diff.max()))
    assert worst_mean < 0.01, worst_mean
    assert worst_max < 1.01, worst_max


def test_only_complete_ycbcr_jpegs_go_to_the_device_decoder():
    from mysproj.evaluation.device_decode import is_device_jpeg

    photo = photos()["coffee"]
    assert is_device_jpeg(jpeg(photo, (120, 90)))
    assert is_device_jpeg(jpeg(photo, (120, 90), progressive=True))
    assert is_device_jpeg(jpeg(photo, (120, 90), subsampling=0))         # 4:4:4
    assert not is_device_jpeg(jpeg(photo, (120, 90), mode="L"))          # greyscale
    assert not is_device_jpeg(jpeg(photo, (120, 90), mode="CMYK"))
    assert not is_device_jpeg(jpeg(photo, (120, 90))[:-300])             # truncated: PIL must see it
    assert not is_device_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(40))


def test_a_file_the_device_decoder_refuses_goes_to_pil(tmp_path):
    """A JPEG whose Huffman table is zeroed passes the header check but fails decoding: it does not fail its
    batch-mates, and then fails in PIL with the same error, naming the file, that decode=cpu raises."""
    from open_clip.transform import image_transform

    from mysproj.data.images import BadImage
    from mysproj.evaluation.device_decode import (
        DeviceBatches,
        clip_pixels,
        collate_encoded,
        decode_jpegs,
        is_device_jpeg,
    )

    good = jpeg(photos()["coffee"], (120, 90))
    at = good.index(b"\xff\xc4") + 5  # inside the first Huffman table
    bad = good[:at] + bytes(16) + good[at + 16:]
    assert is_device_jpeg(bad)
    decoded = decode_jpegs([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, bad, good)], "cpu")
    assert [d is None for d in decoded] == [False, True, False]

    (tmp_path / "bad.jpg").write_bytes(bad)
    batches = DeviceBatches(None, [], clip_pixels(image_transform(64, is_train=False)), batch_size=2, workers=0,
                            device="cpu")
    batch = collate_encoded([(0, str(tmp_path / "good.jpg"), good, None), (1, str(tmp_path / "bad.jpg"), bad, None)])
    with pytest.raises(BadImage, match="bad.jpg: corrupt image"):
        batches.decode(batch)


def test_pixel_spec_of_an_hf_processor():
    from transformers import CLIPImageProcessor

    from mysproj.evaluation.device_decode import pixel_spec

    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})

    def preprocess(img):  # the shape of load_clip's HF wrapper
        return processor(images=img, return_tensors="pt")["pixel_values"][0]

    spec = pixel_spec(preprocess)
    assert (spec.resize, spec.crop, spec.mode, spec.crop_floor) == (40, (32, 32), "bicubic", True)
    assert spec.mean == tuple(processor.image_mean)
    want, got = _pil_vs_tensor(jpeg(photos()["astronaut"], (97, 75)), preprocess, spec)
    assert float((got - want).abs().max()) < 0.02  # HF resizes uint8 tensors the PIL way too


def _eval(tmp_path, name: str, prep: str, model: str, **fields):
    out = str(tmp_path / name)
    summary = stage("eval-clip", model=model, data=prep, out=out, **fields)["summary"]
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    return summary, json.load(open(os.path.join(out, "metrics.json"))), rows


def test_decode_device_agrees_with_cpu(tmp_path, jpeg_prep, clip_tiny_uri):
    """The stage end to end on photos: same predictions and scores with decode=device (a worker process sends
    the bytes; 5 JPEGs decoded as tensors, 3 files through PIL) as with the released code's PIL path."""
    _, cpu_metrics, cpu_rows = _eval(tmp_path, "cpu", jpeg_prep, clip_tiny_uri, workers=0, batch_size=3)
    summary, metrics, rows = _eval(tmp_path, "device", jpeg_prep, clip_tiny_uri, workers=1, batch_size=3,
                                   decode="device")
    assert (cpu_metrics["decode"], metrics["decode"], metrics["precision"]) == ("cpu", "device", "fp32")
    assert metrics["device_decoded_images"] == summary["device_decoded_images"] == 5
    assert cpu_metrics["device_decoded_images"] == 0
    assert [r["image"] for r in rows] == [r["image"] for r in cpu_rows]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in cpu_rows]
    worst = max(abs(a - b) for r, c in zip(rows, cpu_rows) for a, b in zip(r["scores"], c["scores"]))
    assert worst < 1e-5, worst  # measured 1e-6 (scores are stored to 6 decimals); one 2-D resample: 1.1e-4


@pytest.mark.parametrize("fast_tower, graphs", [(False, 1), (True, 3)])
def test_bf16_compiled_tower_compiles_once(tmp_path, monkeypatch, jpeg_prep, clip_tiny_uri,
                                           fast_tower, graphs):
    """precision=bf16 + compile=true: 8 images in batches of 3 (the last one partial, padded) compile once (the
    model's two blocks share a graph; the fast tower has one for the patch embedding, the first block and the
    last), and the scores stay near fp32's. Graph capture as on a GPU, but the aot_eager backend: a cold
    inductor C++ build of the kernels costs ~10 s on CPU (the GPU run exercises inductor)."""
    import functools

    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    _, _, fp32_rows = _eval(tmp_path, "fp32", jpeg_prep, clip_tiny_uri, workers=0, batch_size=3, decode="device")
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    summary, metrics, rows = _eval(tmp_path, "bf16", jpeg_prep, clip_tiny_uri, workers=0, batch_size=3,
                                   decode="device", precision="bf16", compile=True, fast_tower=fast_tower)
    assert counters["stats"]["unique_graphs"] - before == graphs
    assert metrics["precision"] == "bf16" and summary["compile"] is True and len(rows) == 8
    assert summary["fast_tower"] is metrics["fast_tower"] is fast_tower
    worst = max(abs(a - b) for r, c in zip(rows, fp32_rows) for a, b in zip(r["scores"], c["scores"]))
    assert 0 < worst < 0.005, worst  # measured 2.4e-4: bf16 changes the numbers, a little
    torch._dynamo.reset()


def test_fast_tower_agrees_with_the_model_forward(tmp_path, jpeg_prep, clip_tiny_uri):
    """The default (fast_tower) and the model's own encode_image give the same predictions and scores (fp32)."""
    fast, _, fast_rows = _eval(tmp_path, "fast", jpeg_prep, clip_tiny_uri, workers=0, batch_size=3)
    plain, _, rows = _eval(tmp_path, "plain", jpeg_prep, clip_tiny_uri, workers=0, batch_size=3, fast_tower=False)
    assert (fast["fast_tower"], plain["fast_tower"]) == (True, False)
    assert [r["prediction"] for r in fast_rows] == [r["prediction"] for r in rows]
    worst = max(abs(a - b) for r, c in zip(rows, fast_rows) for a, b in zip(r["scores"], c["scores"]))
    assert worst < 1e-5, worst


# ------------------------------------------------------------------ EXIF orientation (the released pipeline load_image)

@pytest.fixture
def exif_prep(tmp_path_factory):
    """One JPEG whose EXIF tag says "rotate 90° clockwise to show" (orientation 6) and a PNG of the same decoded
    pixels turned upright: the released code's `pipeline(...)` loads both as the same image."""
    import io

    from PIL import Image, ImageOps

    root = tmp_path_factory.mktemp("exif-folder")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(photos()["astronaut"]).resize((240, 120)).save(buf, format="JPEG", quality=90,
                                                                    exif=exif.tobytes())
    for folder in ("test/astronaut", "train/astronaut", "test/coffee", "train/coffee"):
        os.makedirs(root / "src" / folder)
    (root / "src/test/astronaut/tagged.jpg").write_bytes(buf.getvalue())
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        upright = ImageOps.exif_transpose(img.convert("RGB"))
    assert upright.size == (120, 240)
    upright.save(root / "src/test/astronaut/upright.png")
    for folder in ("train/astronaut", "train/coffee", "test/coffee"):
        (root / "src" / folder / "c.jpg").write_bytes(jpeg(photos()["coffee"], (64, 64)))
    out = str(root / "prep")
    stage("prep", dataset="imagefolder", source=str(root / "src"), out=out, workers=1)
    return out


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_exif_rotated_jpeg_is_seen_upright(tmp_path, exif_prep, clip_tiny_uri, decode):
    """CLIP zero-shot applies the EXIF orientation, as transformers' load_image does (ImageOps.exif_transpose):
    the tagged JPEG scores as its upright twin (within JPEG-vs-PNG: the same decoded pixels), in both decode paths."""
    _, _, rows = _eval(tmp_path, decode, exif_prep, clip_tiny_uri, workers=0, batch_size=4, decode=decode)
    by_name = {os.path.basename(r["image"]): r["scores"] for r in rows}
    tagged, upright = by_name["tagged.jpg"], by_name["upright.png"]
    assert max(abs(a - b) for a, b in zip(tagged, upright)) < 1e-5, (tagged, upright)
