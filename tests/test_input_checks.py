"""Inputs that used to give silently wrong results: images of other modes (16-bit, 32-bit, float, alpha, palette
with transparency, CMYK), split names, class names evaluation cannot tell apart, and the report's dataset taken
from folder paths instead of manifests."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from dataset_layouts import make_imagefolder
from PIL import Image

from mysproj import cli
from mysproj.config.fields import ConfigError, load_config
from mysproj.config.stages import EvalLlavaConfig, PrepConfig
from mysproj.data.images import open_rgb
from mysproj.errors import EXIT_BAD_INPUT
from mysproj.report.gather import gather
from mysproj.storage.manifest import StageOutput


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _mid_grey(img: Image.Image, fmt: str) -> None:
    rgb = np.asarray(open_rgb(_encoded(img, fmt)))
    assert rgb.shape == (4, 6, 3)
    assert np.all(np.abs(rgb.astype(int) - 128) <= 1), rgb[0, 0]


def test_a_16_bit_greyscale_png_decodes_to_its_grey():
    _mid_grey(Image.fromarray(np.full((4, 6), 32896, dtype=np.uint16)), "PNG")  # 32896 / 257 = 128


def test_a_32_bit_integer_image_decodes_to_its_grey():
    _mid_grey(Image.fromarray(np.full((4, 6), 32896, dtype=np.int32), "I"), "TIFF")


def test_a_float_tiff_in_0_to_1_decodes_to_its_grey():
    _mid_grey(Image.fromarray(np.full((4, 6), 128 / 255, dtype=np.float32), "F"), "TIFF")


def test_transparent_pixels_become_white_not_the_colour_they_hide():
    rgba = Image.new("RGBA", (6, 4), (0, 0, 0, 0))  # fully transparent black
    assert open_rgb(_encoded(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    decoded = open_rgb(_palette_with_transparency(pal))
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((1, 1)) == (200, 30, 30)


def _palette_with_transparency(pal: Image.Image) -> bytes:
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def test_a_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = open_rgb(_encoded(cmyk, "JPEG")).getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fields, expected", [
    ({"train_split": "train", "test_split": "train"}, "both 'train': evaluating on the training images"),
    ({"test_split": ""}, "'test_split' = '': must name one split folder"),
    ({"train_split": "a/b"}, "'train_split' = 'a/b': must name one split folder"),
    ({"train_split": ".."}, "must name one split folder"),
])
def test_split_names_are_checked(fields, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(PrepConfig, overrides={"dataset": "imagefolder", "source": "s", "out": "o", **fields}, env={})


@pytest.mark.parametrize("classes, expected", [
    (("Leaf Spot", "leaf spot", "rust"), "class names 'Leaf Spot' and 'leaf spot' are the same text ('leaf spot')"),
    (("\u65e5\u672c", "rust"), "class name '\u65e5\u672c' has no letters a-z or digits"),
])
def test_class_names_evaluation_cannot_tell_apart_are_refused_at_prep(tmp_path, capsys, classes, expected):
    src = make_imagefolder(str(tmp_path / "src"), {s: dict.fromkeys(classes, 2) for s in ("train", "test")})
    assert cli.main(["prep", "--dataset", "imagefolder", "--source", src, "--out", str(tmp_path / "o"),
                     "--workers", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err, err
    assert not (tmp_path / "o" / "_SUCCESS.json").exists()


# ----------------------------------------------------------------------------- the report's dataset identity

def _prep(uri: str, dataset: str, content: str) -> str:
    out = StageOutput(uri, "prep", load_config(PrepConfig, overrides={"dataset": dataset, "source": "s", "out": uri},
                                               env={}))
    out.write_text("classes.json", content)
    out.commit()
    return uri


def _eval(uri: str, data: str, accuracy: float) -> None:
    cfg = load_config(EvalLlavaConfig, overrides={"model": "m", "data": data, "out": uri}, env={})
    out = StageOutput(uri, "eval-llava", cfg)
    out.write_json("metrics.json", {"accuracy": accuracy, "macro_f1": accuracy})
    out.commit()


def test_the_report_takes_the_dataset_from_the_manifests_not_the_folder(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    # an output copied under dtd/ that read a textures-mini prep output
    _eval(str(a / "dtd/zero-shot/eval-llava"), _prep(str(a / "textures-mini/prep"), "textures-mini", "1"), 0.5)
    # two roots of 'imagefolder' prepared from different sources: two datasets, not two seeds of one
    _eval(str(a / "imagefolder/ft-full/seed0/eval-llava"), _prep(str(a / "imagefolder/prep"), "imagefolder", "x"), 0.1)
    _eval(str(b / "imagefolder/ft-full/seed1/eval-llava"), _prep(str(b / "imagefolder/prep"), "imagefolder", "y"), 0.9)
    with caplog.at_level(logging.WARNING):
        runs = gather([str(a), str(b)])
    names = sorted(r.dataset for r in runs)
    assert names[2] == "textures-mini" and "lies under 'dtd' but read a 'textures-mini' prep output" in caplog.text
    assert names[0].startswith("imagefolder@") and names[1].startswith("imagefolder@") and names[0] != names[1]


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    src = make_imagefolder(str(tmp_path / "src"), {s: {"rust": 2, "scab": 2} for s in ("train", "test")})
    first = sorted((tmp_path / "src" / "train" / "rust").iterdir())[0]
    os.rename(bytes(first), os.path.join(bytes(first.parent), b"caf\xe9.jpg"))
    assert cli.main(["prep", "--dataset", "imagefolder", "--source", src, "--out", str(tmp_path / "o"),
                     "--workers", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "caf\\xe9.jpg: a file or folder name that is not UTF-8" in err, err
