import os
import random

import pytest
from dataset_layouts import image_bytes, write, write_truncated_jpeg
from PIL import Image

from mysproj.data.images import CLIP_MEAN_RGB, BadImage, check_bytes, expand2square, open_rgb
from mysproj.data.labels import normalise_label, ordered_classes
from mysproj.data.prompts import classes_string, classification_prompt
from mysproj.errors import BadInput


def test_label_rules():
    assert normalise_label("  Bell_pepper leaf spot ") == "Bell pepper leaf spot"
    assert normalise_label("  Bell_pepper leaf spot ", "delete") == "Bellpepper leaf spot"
    assert normalise_label("_a__b_") == "a b"
    assert ordered_classes(["b", "a", "b", "C"]) == ["C", "a", "b"]


def test_prompt_matches_the_paper():
    rng = random.Random(0)
    text = classification_prompt("plant leaf diseases", ["x", "y"], rng)
    assert text.startswith("<image>\nClassify this image into one of the following categories relating to "
                           "plant leaf diseases: ")
    assert text.endswith(". Only output a single final classification label and NOTHING ELSE.")
    assert classification_prompt("t", ["x"], rng, "code").endswith("NOTHING ELSE.\n\nOutput:")
    assert classes_string(["a", "b", "c"], random.Random(1)).count('", "') == 2


def test_open_rgb_and_bad_images(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 3), 9).save(gray)
    assert open_rgb(str(gray)).mode == "RGB"
    assert open_rgb(image_bytes(1)).size == (24, 16)
    with pytest.raises(BadImage, match="corrupt image"):
        open_rgb(write_truncated_jpeg(str(tmp_path / "t.jpg")))
    with pytest.raises(BadImage, match="not an image"):
        open_rgb(write(str(tmp_path / "x.jpg"), b"hello"))
    with pytest.raises(BadInput, match="no such file"):
        open_rgb(str(tmp_path / "missing.jpg"))
    assert check_bytes(b"").error == "empty file"
    ok = check_bytes(image_bytes(2, "PNG"))
    assert ok.ok and (ok.width, ok.height) == (24, 16)


def test_expand2square_pads_with_clip_mean():
    assert CLIP_MEAN_RGB == (122, 116, 104)
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = expand2square(img)
    assert sq.size == (4, 4)
    assert sq.getpixel((0, 0)) == CLIP_MEAN_RGB and sq.getpixel((0, 1)) == (255, 0, 0)
    tall = expand2square(Image.new("RGB", (1, 3), (0, 0, 255)))
    assert tall.size == (3, 3) and tall.getpixel((1, 0)) == (0, 0, 255) and tall.getpixel((0, 0)) == CLIP_MEAN_RGB


def test_decode_workers_default_is_one_per_available_core(monkeypatch):
    from mysproj.config import load_config
    from mysproj.config.stages import EvalClipConfig, EvalLlavaConfig, ProbeConfig
    from mysproj.evaluation import batches

    for cls in (EvalClipConfig, EvalLlavaConfig, ProbeConfig):  # the image-only stages are bound by decoding
        assert load_config(cls, overrides={"model": "m", "data": "d", "out": "o"}, env={}).workers == -1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert batches.decode_workers(-1) == batches.AUTO_WORKERS_CAP
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert (batches.decode_workers(-1), batches.decode_workers(0), batches.decode_workers(8)) == (3, 0, 3)
