"""The eval stages and the report against a real S3 server (SeaweedFS): every input and output an s3:// URI."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from stage_runs import stage  # noqa: E402

pytestmark = pytest.mark.s3


def test_eval_clip_eval_llava_and_report_on_s3(s3_env, tmp_path):
    from mysproj.storage import read_text

    root = f"{s3_env.create_bucket('evalruns')}/{tmp_path.name}"
    prep = f"{root}/textures-mini/prep"
    stage("prep", dataset="textures-mini", out=prep, max_per_class=2, workers=1)
    stage("model-init", preset="clip-tiny", out=f"{root}/models/clip-tiny")
    stage("model-init", preset="tiny", out=f"{root}/models/tiny")
    stage("eval-clip", model=f"{root}/models/clip-tiny", data=prep, workers=0,
                  out=f"{root}/textures-mini/zero-shot/eval-clip")
    stage("eval-llava", model=f"{root}/models/tiny", data=prep, workers=0, mode="scoring",
                  out=f"{root}/textures-mini/zero-shot/eval-llava")
    metrics = json.loads(read_text(f"{root}/textures-mini/zero-shot/eval-llava/metrics.json"))
    assert metrics["n"] == 8 and metrics["unparsed"] == 0
    m = stage("report", runs=[root], out=f"{root}/report")
    text = read_text(f"{root}/report/report.md")
    assert m["summary"]["runs"] == 2
    assert "| CLIP zero-shot |" in text and "| LLaVA-1.5 zero-shot |" in text
    assert "random weights preset clip-tiny" in text


def test_load_clip_from_a_plain_s3_folder(s3_env, tmp_path):
    """Weights brought by the user: an open_clip folder in object storage without a stage manifest."""
    import os

    from mysproj.models.clip import load_clip

    local = str(tmp_path / "clip")
    stage("model-init", preset="clip-tiny", out=local)
    target = f"{s3_env.create_bucket('weights')}/{tmp_path.name}/clip-tiny"
    fs = s3_env.filesystem()
    for name in os.listdir(local):
        if name != "_SUCCESS.json":
            fs.put_file(os.path.join(local, name), f"{target[5:]}/{name}")
    clip = load_clip(target)
    ref = load_clip(local)
    import torch

    tokens = clip.tokenizer(["This is a photo of brick."])
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_text(tokens), ref.model.encode_text(tokens))
