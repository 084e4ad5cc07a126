"""image_backend=pil: LLaVA's images prepared by CLIPImageProcessorPil (the PIL resize of the transformers the
released scripts pinned) instead of transformers 5's torchvision-backed CLIPImageProcessor."""

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import stage  # noqa: E402


def _photo(size):
    from PIL import Image
    from skimage import data as sk

    return Image.fromarray(sk.astronaut()).resize(size)


def test_pil_backend_is_clip_image_processor_pil_with_the_same_settings():
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    from mysproj.models.processors import with_backend

    fast = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert with_backend(fast, "torchvision") is fast
    pil = with_backend(fast, "pil")
    assert isinstance(pil, CLIPImageProcessorPil)
    assert (pil.image_mean, pil.image_std, pil.resample) == (fast.image_mean, fast.image_std, fast.resample)
    images = [_photo((500, 375)), _photo((333, 517))]
    got = pil(images=images, return_tensors="pt")["pixel_values"]
    want = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, want)
    levels = ((got - fast(images=images, return_tensors="pt")["pixel_values"])
              * torch.tensor(fast.image_std)[:, None, None] * 255).abs()
    assert 0 < float(levels.max()) <= 2.01  # the two implementations are a level or two of 255 apart


def test_probe_features_come_from_the_chosen_backend(tmp_path, prep_uri, llava_tiny_uri):
    from safetensors.torch import load_file

    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import pixel_values
    from mysproj.models.loading import load_llava
    from mysproj.models.processors import with_backend
    from mysproj.stages.probe import image_feature_set

    out = str(tmp_path / "probe")
    stage("probe", model=llava_tiny_uri, data=prep_uri, out=out, protocol="code", max_epochs=1, workers=0,
          image_backend="pil")
    feats = load_file(os.path.join(out, "features/test.safetensors"))
    loaded = load_llava(llava_tiny_uri)
    data = PreparedData(prep_uri)
    images = [data.open_image(s) for s in data.samples("test")]
    want = {b: image_feature_set(loaded.model, pixel_values(images, with_backend(loaded.image_processor, b)))
            for b in ("pil", "torchvision")}
    torch.testing.assert_close(feats["pre_mean"], want["pil"]["pre_mean"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(feats["pre_mean"], want["torchvision"]["pre_mean"], atol=1e-6, rtol=1e-5)
