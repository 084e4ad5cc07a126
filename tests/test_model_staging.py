"""Hub snapshots staged as safetensors model folders (mysproj.models.snapshot): the original LLaVA layout with its
CLIP tower, an HF-layout LLaVA and a CLIP, each in the `.bin` pickles the hub holds, load to exactly what the
snapshot loads to; bad pickles, damaged shards and a missing tower are refused before anything is written."""

import glob
import json
import os
import shutil
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hub_models import clip_files, llava_original_files, write_files  # noqa: E402
from stage_runs import stage  # noqa: E402


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return (write_files(llava_original_files(), str(root / "llava-v1.5-7b")),
            write_files(clip_files(), str(root / "clip-vit-large-patch14-336")))


@pytest.fixture(scope="module")
def staged(hub, tmp_path_factory):
    from mysproj.models.snapshot import stage_llava

    llava, clip = hub
    out = str(tmp_path_factory.mktemp("staged") / "llava")
    return out, stage_llava(llava, out, tower=clip, max_shard_bytes=150_000)


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _config(model) -> dict:
    d = model.config.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return d


def test_original_bin_snapshot_stages_to_the_same_model(hub, staged):
    from PIL import Image

    from mysproj.models.loading import load_llava

    llava, clip = hub
    assert sorted(n for n in os.listdir(llava) if n.endswith(".bin")) == [
        "mm_projector.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    out, summary = staged
    assert summary["layout"] == "hf" and summary["converted_from"] == "original" and summary["dtype"] == "float16"
    assert not glob.glob(os.path.join(out, "**", "*.bin"), recursive=True)
    want = load_llava(llava, vision_tower=clip)
    got = load_llava(out)
    assert want.layout == "original" and got.layout == "hf"
    _same_state(got.model, want.model)
    assert summary["tensors"] == len(want.model.state_dict())
    assert summary["bytes"] == sum(t.nbytes for t in want.model.state_dict().values())
    assert _config(got.model) == _config(want.model)
    # the released SentencePiece vocabulary (500) + <image>, <pad>; embedding rows padded to a multiple of 64
    assert "tokenizer.model" in os.listdir(llava) and not os.path.exists(os.path.join(llava, "tokenizer.json"))
    assert got.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [500, 501] == \
        want.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    assert got.model.config.text_config.vocab_size == 512 and got.model.config.image_token_index == 500

    prompt = "USER: <image>\nWhat texture is this? ASSISTANT:"
    assert len(got.tokenizer) == len(want.tokenizer)
    for text in (prompt, "A chat between a curious human and an AI. USER: Ünïcödé 12 ✓<pad></s>", " lead space"):
        assert got.tokenizer(text).input_ids == want.tokenizer(text).input_ids, text
        ids = want.tokenizer(text).input_ids
        assert got.tokenizer.decode(ids) == want.tokenizer.decode(ids)
    image = Image.new("RGB", (50, 37), (120, 30, 200))
    pix = got.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(pix, want.image_processor(images=image, return_tensors="pt")["pixel_values"])
    ids = torch.tensor([want.tokenizer(prompt.replace("<image>", "<image>" * want.model.config.image_seq_length))
                        .input_ids])
    with torch.no_grad():
        a = got.model(input_ids=ids, pixel_values=pix.half()).logits
        b = want.model(input_ids=ids, pixel_values=pix.half()).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_staged_shards_keep_tower_and_projector_apart(staged):
    from safetensors import safe_open

    out, summary = staged
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) and len(files) == summary["files"]
    assert len(files) >= 4 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for f in files:
        with safe_open(os.path.join(out, f), "pt") as st:
            keys = list(st.keys())
        groups = {k.startswith("model.multi_modal_projector.") * 1 + k.startswith("model.vision_tower.") * 2
                  for k in keys}
        assert len(groups) == 1, f  # language model, projector and tower never share a shard
        assert set(keys) == {k for k, v in index["weight_map"].items() if v == f}
    assert index["metadata"]["total_size"] == summary["bytes"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= set(os.listdir(out))


@dataclass
class _FetchConfig:
    out: str
    source: str = "hf://liuhaotian/llava-v1.5-7b"


def test_fetch_output_is_a_model_like_model_init(staged, tmp_path):
    """A `fetch` stage output holding the staged folder: materialize, direct safetensors loads, the probe's
    vision-only load and merge's reuse of the base's shards all take it."""
    from mysproj.config.lineage import provenance as model_provenance
    from mysproj.models.loading import hf_model_output, load_llava, materialize
    from mysproj.models.vision_only import load_vision
    from mysproj.storage.manifest import StageOutput

    folder, summary = staged
    uri = str(tmp_path / "fetched")
    out = StageOutput(uri, "fetch", _FetchConfig(uri))
    out.begin()
    out.put_dir(folder)
    out.commit(summary)
    assert materialize(uri)[1].layout == "hf" and hf_model_output(uri) is not None
    full = load_llava(uri, direct=True)
    assert full.random_weights is False and model_provenance(uri)["random_weights"] is False
    vision = load_vision(uri)
    assert vision is not None
    sd = full.model.state_dict()
    for k, v in vision.model.state_dict().items():
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            assert torch.equal(v, sd[k]), k

    projector = tmp_path / "projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.ones_like(sd["model.multi_modal_projector.linear_1.weight"]),
                "model.mm_projector.0.bias": torch.zeros_like(sd["model.multi_modal_projector.linear_1.bias"]),
                "model.mm_projector.2.weight": torch.ones_like(sd["model.multi_modal_projector.linear_2.weight"]),
                "model.mm_projector.2.bias": torch.zeros_like(sd["model.multi_modal_projector.linear_2.bias"])},
               projector)
    merged = stage("merge", base=uri, projector=str(projector), out=str(tmp_path / "merged"))
    assert merged["summary"]["reused"]["files"] > 0 and len(merged["summary"]["rewritten"]) == 1
    assert model_provenance(str(tmp_path / "merged"))["chain"] == ["merge", "fetch"]
    m = load_llava(str(tmp_path / "merged")).model.state_dict()
    assert torch.equal(m["model.multi_modal_projector.linear_1.weight"],
                       torch.ones_like(sd["model.multi_modal_projector.linear_1.weight"]))
    assert torch.equal(m["model.language_model.embed_tokens.weight"], sd["model.language_model.embed_tokens.weight"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused(hub, tmp_path):
    from mysproj.errors import BadInput
    from mysproj.models.snapshot import stage_llava

    llava, clip = hub
    bad = tmp_path / "llava"
    shutil.copytree(llava, bad)
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _Evil(marker)}, bad / "pytorch_model-00002-of-00002.bin")
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"pytorch_model-00002-of-00002\.bin: refused: its pickle asks for "
                                       r"posix\.system"):
        stage_llava(str(bad), str(out), tower=clip)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_shard_is_named(hub, tmp_path, damage):
    from mysproj.errors import BadInput
    from mysproj.models.snapshot import stage_llava

    llava, clip = hub
    bad = tmp_path / "llava"
    shutil.copytree(llava, bad)
    shard = bad / "pytorch_model-00001-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    out = tmp_path / "out"
    out.mkdir()  # an empty folder given by the caller stays empty
    with pytest.raises(BadInput, match=r"pytorch_model-00001-of-00002\.bin"):
        stage_llava(str(bad), str(out), tower=clip)
    assert os.listdir(out) == []


def test_original_layout_needs_its_tower(hub, tmp_path):
    from mysproj.errors import BadInput
    from mysproj.models.snapshot import stage_llava

    out = tmp_path / "out"
    with pytest.raises(BadInput, match="mm_vision_tower 'openai/clip-vit-large-patch14-336'"):
        stage_llava(hub[0], str(out))
    assert not out.exists()


def test_hf_layout_bin_snapshot(tiny_model, tmp_path):
    from mysproj.models.loading import load_llava, read_weights
    from mysproj.models.snapshot import stage_llava

    snap = tmp_path / "llava-hf"
    snap.mkdir()
    for name in os.listdir(tiny_model):
        if not name.endswith(".safetensors") and not name.endswith(".index.json") and not name.startswith("_"):
            shutil.copy(os.path.join(tiny_model, name), snap / name)
    state = read_weights(tiny_model, tiny_model)
    legacy_prefix = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                     "model.vision_tower.": "vision_tower.vision_model.",
                     "model.multi_modal_projector.": "multi_modal_projector."}

    def legacy_name(k):  # llava-hf's released names, which transformers still maps onto its modules
        p = next(p for p in legacy_prefix if k.startswith(p))
        return legacy_prefix[p] + k[len(p):]

    legacy = {legacy_name(k): v.clone() for k, v in state.items()}
    torch.save(legacy, snap / "pytorch_model.bin")
    out = tmp_path / "out"
    summary = stage_llava(str(snap), str(out))
    assert summary["converted_from"] == "hf" and summary["layout"] == "hf"
    assert not glob.glob(str(out / "*.bin")) and (out / "model.safetensors.index.json").exists()
    assert json.load(open(out / "config.json")) == json.load(open(snap / "config.json"))
    _same_state(load_llava(str(out)).model, load_llava(str(snap)).model)
    _same_state(load_llava(str(out)).model, load_llava(tiny_model).model)


def test_clip_bin_snapshot_loads_in_eval_clip_as_before(hub, tmp_path):
    from PIL import Image

    from mysproj.models.clip import load_clip
    from mysproj.models.loading import load_llava
    from mysproj.models.snapshot import stage_clip, stage_llava

    clip = hub[1]
    out = tmp_path / "clip"
    summary = stage_clip(clip, str(out))
    assert summary["files"] == ["model.safetensors"] and summary["kind"] == "hf"
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    want, got = load_clip(clip), load_clip(str(out))
    assert got.kind == want.kind == "hf"
    _same_state(got.model.model, want.model.model)
    stored = torch.load(os.path.join(clip, "pytorch_model.bin"), weights_only=True)
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(stored) and all(torch.equal(written[k], stored[k]) for k in stored)  # keys unchanged
    image = Image.new("RGB", (40, 60), (10, 200, 30))
    assert torch.equal(got.preprocess(image), want.preprocess(image))
    texts = ["a photo of a brick wall.", "a photo of grass."]
    assert torch.equal(got.tokenizer(texts), want.tokenizer(texts))
    with torch.no_grad():
        assert torch.equal(got.model.encode_image(got.preprocess(image)[None]),
                           want.model.encode_image(want.preprocess(image)[None]))
    # the staged CLIP serves as the LLaVA's tower just as the snapshot does
    llava_out = tmp_path / "llava"
    stage_llava(hub[0], str(llava_out), tower=str(out))
    _same_state(load_llava(str(llava_out)).model, load_llava(hub[0], vision_tower=clip).model)


def test_original_safetensors_with_its_tower_beside_it(tiny_model, tiny_original, tmp_path):
    """mysproj's own original-layout export (safetensors, the tower in `vision_tower/`, found without being
    named) stages back to the model it was exported from."""
    from mysproj.models.loading import load_llava
    from mysproj.models.snapshot import stage_llava

    out = tmp_path / "out"
    summary = stage_llava(tiny_original, str(out), max_shard_bytes=10**9)
    assert summary["converted_from"] == "original" and summary["dtype"] == "float32"
    assert summary["files"] == 3  # one shard each: language model, projector, tower
    staged = load_llava(str(out)).model
    _same_state(staged, load_llava(tiny_original).model)
    _same_state(staged, load_llava(tiny_model).model)


def test_open_clip_bin_snapshot(clip_tiny_uri, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from mysproj.models.clip import load_clip
    from mysproj.models.snapshot import stage_clip

    snap = tmp_path / "open-clip"
    snap.mkdir()
    shutil.copy(os.path.join(clip_tiny_uri, "open_clip_config.json"), snap)
    torch.save(load_file(os.path.join(clip_tiny_uri, "open_clip_model.safetensors")),
               snap / "open_clip_pytorch_model.bin")
    out = tmp_path / "out"
    summary = stage_clip(str(snap), str(out))
    assert summary["kind"] == "open_clip" and summary["files"] == ["open_clip_model.safetensors"]
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    want, got = load_clip(str(snap)), load_clip(str(out))
    assert got.kind == want.kind == "open_clip"
    _same_state(got.model, want.model)
    image = Image.new("RGB", (70, 50), (90, 90, 250))
    with torch.no_grad():
        assert torch.equal(got.model.encode_image(got.preprocess(image)[None]),
                           want.model.encode_image(want.preprocess(image)[None]))


def test_hf_layout_with_a_missing_tensor_is_refused(tiny_model, tmp_path):
    """transformers would fill a missing tensor with random values and only warn; staging refuses it."""
    from mysproj.errors import BadInput
    from mysproj.models.loading import read_weights
    from mysproj.models.snapshot import stage_llava

    snap = tmp_path / "llava-hf"
    snap.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(os.path.join(tiny_model, name), snap / name)
    state = read_weights(tiny_model, tiny_model)
    torch.save({k: v.clone() for k, v in state.items() if k != "model.language_model.norm.weight"},
               snap / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(BadInput, match="missing: model.language_model.norm.weight"):
        stage_llava(str(snap), str(out))
    assert not out.exists()
