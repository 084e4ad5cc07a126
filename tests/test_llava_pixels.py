"""decode=device for LLaVA's stages (eval-llava, probe): JPEGs decoded as tensors, padded to a square and put
through the model's image processor on the device; the released code's PIL path is the reference."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")

from photo_files import jpeg, photos  # noqa: E402
from stage_runs import stage  # noqa: E402

SIZES = [(500, 375), (375, 500), (300, 300), (1024, 700), (200, 150), (97, 75)]
# RGB JPEGs of jpeg_prep (tests/photo_files.py): 5 in the test split, 3 in train; a greyscale and a CMYK JPEG and a
# PNG go through PIL
DEVICE_JPEGS = {"test": 5, "train": 3}


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("size", [336, 64])
def test_device_pixels_equal_the_processors_on_photos(backend, aspect, size):
    """Photos of several sizes and aspects: with transformers' torchvision-backend processor (the default) the
    tensor path gives exactly the CPU path's pixels (the same processor on the same decoded bytes, the padding done
    on the tensor); with the PIL backend, PIL's resampling within rounding (measured: mean 0.0004, at most 2 of 255
    levels)."""
    from transformers import CLIPImageProcessor

    from mysproj.data.images import open_rgb
    from mysproj.evaluation.device_decode import decode_jpegs, llava_pixels
    from mysproj.models.conversation import image_transform
    from mysproj.models.processors import with_backend

    processor = with_backend(CLIPImageProcessor(size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size}), backend)
    device, host = llava_pixels(processor, aspect), image_transform(processor, aspect)
    assert device.crop == (size, size) and device.upright is False
    levels = torch.tensor(processor.image_std)[:, None, None] * 255
    worst_mean = worst_max = 0.0
    for photo in photos().values():
        for wh in SIZES:
            raw = jpeg(photo, wh)
            (decoded,) = decode_jpegs([torch.frombuffer(bytearray(raw), dtype=torch.uint8)], "cpu")
            got, want = device.on_device([decoded])[0], host(open_rgb(raw))
            assert got.shape == want.shape == (3, size, size) and got.dtype == torch.float32
            diff = ((got - want) * levels).abs()
            worst_mean, worst_max = max(worst_mean, float(diff.mean())), max(worst_max, float(diff.max()))
    if backend == "torchvision":
        assert worst_max == 0, worst_max
    else:
        assert worst_mean < 0.01 and worst_max < 2.01, (worst_mean, worst_max)


def test_padding_a_tensor_is_expand2square():
    import numpy as np
    from PIL import Image

    from mysproj.data.images import expand2square
    from mysproj.evaluation.device_decode import pad_square

    for w, h in [(7, 4), (4, 7), (5, 5), (6, 3)]:
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy())
        want = torch.from_numpy(np.asarray(expand2square(img, (122, 116, 104))).copy()).permute(2, 0, 1)
        got = pad_square(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), (122, 116, 104))
        assert torch.equal(got, want), (w, h)


def test_probe_decode_device_gives_the_cpu_paths_features(tmp_path, jpeg_prep, llava_tiny_uri):
    """The probe end to end on photos: decode=device (a worker process sends the bytes) stores exactly the features
    decode=cpu stores, and says how many images the device decoded."""
    from safetensors.torch import load_file

    runs = {}
    for decode, workers in (("cpu", 0), ("device", 1)):
        out = str(tmp_path / decode)
        summary = stage("probe", model=llava_tiny_uri, data=jpeg_prep, out=out, protocol="code", max_epochs=2,
                        workers=workers, batch_size=3, decode=decode)["summary"]
        runs[decode] = (summary, json.load(open(os.path.join(out, "metrics.json"))),
                        {split: load_file(os.path.join(out, f"features/{split}.safetensors"))
                         for split in ("train", "test")})
    (cpu_summary, cpu_metrics, cpu_feats), (summary, metrics, feats) = runs["cpu"], runs["device"]
    assert (cpu_metrics["decode"], metrics["decode"]) == ("cpu", "device")
    assert metrics["device_decoded_images"] == summary["device_decoded_images"] == sum(DEVICE_JPEGS.values())
    assert cpu_metrics["device_decoded_images"] == cpu_summary["device_decoded_images"] == 0
    for split in ("train", "test"):
        for kind in ("pre_cls", "pre_mean", "post", "label_id"):
            assert torch.equal(feats[split][kind], cpu_feats[split][kind]), (split, kind)


def test_eval_llava_decode_device_gives_the_cpu_paths_answers(tmp_path, jpeg_prep, llava_tiny_uri):
    rows = {}
    for decode, workers in (("cpu", 0), ("device", 1)):
        out = str(tmp_path / decode)
        summary = stage("eval-llava", model=llava_tiny_uri, data=jpeg_prep, out=out, workers=workers, batch_size=3,
                        max_new_tokens=4, decode=decode)["summary"]
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics["decode"] == decode
        assert metrics["device_decoded_images"] == summary["device_decoded_images"] == \
            (DEVICE_JPEGS["test"] if decode == "device" else 0)
        rows[decode] = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    assert [(r["image"], r["answer"], r["prediction"]) for r in rows["device"]] == \
        [(r["image"], r["answer"], r["prediction"]) for r in rows["cpu"]]
