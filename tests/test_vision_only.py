"""The probe's vision-only load: the tower and projector only, the language model's shards never read, and the
same image features as the whole model gives."""

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import stage  # noqa: E402


def _pixels(prep_uri, processor, n=5):
    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import pixel_values

    data = PreparedData(prep_uri)
    return pixel_values([data.open_image(s) for s in data.samples("test")[:n]], processor)


@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_same_features_as_the_whole_model(prep_uri, llava_tiny_uri, dtype, pooling):
    from mysproj.models.loading import load_llava
    from mysproj.models.vision_only import load_vision
    from mysproj.stages.probe import image_features

    whole = load_llava(llava_tiny_uri, dtype=dtype)
    part = load_vision(llava_tiny_uri, dtype=dtype)
    assert all(p.is_meta for p in part.model.model.language_model.parameters())
    assert part.model.dtype == whole.model.dtype
    pix = _pixels(prep_uri, whole.image_processor).to(whole.model.dtype)
    for got, want in zip(image_features(part.model, pix, pooling), image_features(whole.model, pix, pooling)):
        assert torch.equal(got, want)


def test_shards_of_the_language_model_are_never_read(tmp_path, prep_uri, tiny_sharded):
    """A sharded model whose language-model shards are corrupt still gives the tower and projector (those shards
    are not even verified), and the probe stage uses that path."""
    from mysproj.models.vision_only import load_vision

    out = str(tmp_path / "sharded")
    shutil.copytree(tiny_sharded, out)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    lm_shards = {f for k, f in index.items() if not k.startswith(("model.vision_tower.", "model.multi_modal"))}
    for f in lm_shards:
        with open(os.path.join(out, f), "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            fh.write(b"\0")
    assert load_vision(out) is not None
    m = stage("probe", model=out, data=prep_uri, out=str(tmp_path / "probe"), workers=0, max_epochs=2,
                      batch_size=8)
    assert m["summary"]["vision_only"] is True


def test_other_models_load_whole(tiny_original):
    from mysproj.models.vision_only import load_vision

    assert load_vision(tiny_original) is None  # a plain folder in the original layout
