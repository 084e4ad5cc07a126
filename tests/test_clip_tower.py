"""`mysproj.models.clip_tower`: CLIP's image embedding from the model's own weights, equal to open_clip's and
transformers' forward, one compiled graph for every middle block, and None where it does not apply."""

import json

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from mysproj.models.clip import TINY_MODEL_CFG, LoadedClip, _HFClip  # noqa: E402
from mysproj.models.clip_tower import ClipTower  # noqa: E402


def _open_clip(tmp_path, layers: int = 2, **cfg_changes):
    cfg = json.loads(json.dumps(TINY_MODEL_CFG))
    cfg["vision_cfg"]["layers"] = layers
    for key, value in cfg_changes.items():
        (cfg["vision_cfg"] if key in ("ls_init_value", "attentional_pool") else cfg)[key] = value
    with open(tmp_path / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    return LoadedClip(model, None, None, "open_clip", str(tmp_path))


def _hf(act: str):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=56, patch_size=14, hidden_act=act),
                     projection_dim=24)
    return LoadedClip(_HFClip(CLIPModel(cfg).eval(), torch), None, None, "hf", "hf")


def _pixels(clip, n: int = 5):
    size = (clip.model.visual.image_size[0] if clip.kind == "open_clip"
            else clip.model.model.config.vision_config.image_size)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_equals_open_clip(tmp_path, quick_gelu):
    clip = _open_clip(tmp_path, layers=3, quick_gelu=quick_gelu)
    tower = ClipTower.of(clip)
    assert tower.act == ("quick_gelu" if quick_gelu else "gelu")
    x = _pixels(clip)
    with torch.no_grad():
        ref = clip.model.encode_image(x, normalize=True)
    torch.testing.assert_close(tower.encode(x), ref, rtol=0, atol=1e-6)  # measured 1.2e-7


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_equals_transformers(act):
    clip = _hf(act)
    x = _pixels(clip)
    with torch.no_grad():
        ref = clip.model.encode_image(x, normalize=True)
    torch.testing.assert_close(ClipTower.of(clip).encode(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", [{"ls_init_value": 0.1}, {"attentional_pool": True}])
def test_towers_it_does_not_cover(tmp_path, change):
    assert ClipTower.of(_open_clip(tmp_path, **change)) is None


def test_tanh_gelu_is_not_covered():
    assert ClipTower.of(_hf("gelu_new")) is None


def test_one_graph_for_the_middle_blocks(tmp_path, compile_counter):
    """Six blocks, two batches: four graphs (patch embedding, first block, middle blocks, last block at the class
    token); more blocks or another batch of the same shape add none."""
    clip = _open_clip(tmp_path, layers=6)
    tower = ClipTower.of(clip, compile=True)
    for seed in (1, 2):
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(tower.encode(x), clip.model.encode_image(x, normalize=True), rtol=0,
                                       atol=1e-6)
    assert compile_counter.frame_count == 4
