"""model-init presets, the offline tokenizer, and loading both LLaVA layouts (conversion checked against
transformers' own checkpoint conversion)."""

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import weights  # noqa: E402


def test_model_init_tiny_is_a_working_llava(tiny_model):
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    manifest = json.load(open(os.path.join(tiny_model, "_SUCCESS.json")))
    assert manifest["summary"]["random_weights"] is True and manifest["summary"]["preset"] == "tiny"
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.text_config.vocab_size % 64 == 0 >= len(tok) - model.config.text_config.vocab_size
    ids = tok("USER: <image>\nWhat texture? ASSISTANT: brick</s>").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    proc = AutoProcessor.from_pretrained(tiny_model)
    inputs = proc(images=Image.new("RGB", (40, 30), (200, 10, 10)), text="USER: <image>\nhi ASSISTANT:",
                  return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == model.config.image_seq_length
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()


def test_tokenizer_training_is_deterministic():
    from mysproj.models.tokenizer import train_bpe

    assert train_bpe(600).to_str() == train_bpe(600).to_str()


def test_llava_7b_preset_has_the_real_architecture():
    from transformers import LlavaForConditionalGeneration

    from mysproj.models.presets import PRESETS, llava_config
    from mysproj.models.tokenizer import build_tokenizer

    cfg = llava_config(PRESETS["llava-1.5-7b"], build_tokenizer(PRESETS["llava-1.5-7b"].tokenizer_vocab))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert proj == 20_979_712  # docs/paper.md#llava-15-internals: 1024*4096+4096 + 4096*4096+4096
    assert cfg.text_config.vocab_size == 32064 and cfg.image_seq_length == 576
    assert cfg.text_config.num_hidden_layers == 32 and cfg.text_config.hidden_size == 4096
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.num_hidden_layers == 24 and cfg.vision_feature_layer == -2
    total = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < total < 7.1e9  # llava-1.5-7b-hf: 7.06B


def _original_without_llava_tokens(tiny_model, folder):
    """An original-layout checkpoint as released: Vicuna-style vocabulary (no <image>/<pad>), CLIP apart."""
    from mysproj.models.conversion import hf_to_original, split_original
    from mysproj.models.loading import load_llava, write_original
    from mysproj.models.tokenizer import build_tokenizer

    loaded = load_llava(tiny_model)
    tok = build_tokenizer(1024, llava_tokens=False)
    n = len(tok)
    sd = dict(loaded.model.state_dict())
    sd["model.language_model.embed_tokens.weight"] = sd["model.language_model.embed_tokens.weight"][:n].clone()
    sd["lm_head.weight"] = sd["lm_head.weight"][:n].clone()
    write_original(sd, loaded.model.config, tok, loaded.image_processor, folder)
    main, tower = split_original(hf_to_original(sd))
    return main, tower, n


def test_original_layout_converts_like_transformers(tiny_model, tmp_path):
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from mysproj.models.conversion import original_to_legacy_hf
    from mysproj.models.loading import load_llava

    folder = str(tmp_path / "llava-v1.5-tiny")
    main, tower, n = _original_without_llava_tokens(tiny_model, folder)
    assert "model.mm_projector.0.weight" in main and "model.layers.0.self_attn.q_proj.weight" in main
    assert not any(k.startswith("model.vision_tower") for k in main)
    ours = load_llava(folder)
    assert ours.layout == "original"

    # transformers' path: the conversion script's key mapping, then the library's own loader (its checkpoint
    # conversion mapping from legacy llava-hf names to the current module tree).
    original = dict(main)
    original.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    legacy = original_to_legacy_hf(original)
    assert legacy["multi_modal_projector.linear_1.weight"] is original["model.mm_projector.0.weight"]
    assert legacy["multi_modal_projector.linear_2.bias"] is original["model.mm_projector.2.bias"]
    assert legacy["language_model.lm_head.weight"] is original["lm_head.weight"]
    assert legacy["language_model.model.layers.1.mlp.up_proj.weight"] is original["model.layers.1.mlp.up_proj.weight"]
    key = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
    assert legacy["vision_tower." + key] is original["model.vision_tower.vision_tower." + key]
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    cfg = ours.model.config.__class__.from_dict(ours.model.config.to_dict())
    cfg.text_config.vocab_size = n
    cfg.text_config.pad_token_id = None
    cfg.save_pretrained(ref_dir)
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(ref_dir / "model.safetensors"))
    ref, info = LlavaForConditionalGeneration.from_pretrained(str(ref_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    got, want = ours.model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    vocab_rows = ("model.language_model.embed_tokens.weight", "lm_head.weight")
    for k in want:
        if k in vocab_rows:
            assert torch.equal(got[k][:n], want[k]), k
        else:
            assert torch.equal(got[k], want[k]), k
    # <image> and <pad> added as the conversion does; rows padded to a multiple of 64, new rows near the mean
    assert ours.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1]
    assert ours.model.config.image_token_index == n and got[vocab_rows[0]].shape[0] == 1088
    new = got[vocab_rows[0]][n:]
    assert torch.isfinite(new).all()
    assert (new - want[vocab_rows[0]].mean(0)).abs().max() < 0.05
    assert torch.equal(load_llava(folder).model.state_dict()[vocab_rows[0]], got[vocab_rows[0]])  # seeded


def test_hf_original_round_trip_is_bit_exact(tiny_model, tiny_original):
    from mysproj.models.conversion import hf_to_original, original_to_hf
    from mysproj.models.loading import load_llava

    hf = load_llava(tiny_model).model.state_dict()
    back = load_llava(tiny_original)
    assert back.layout == "original" and back.random_weights is False
    sd = back.model.state_dict()
    assert set(sd) == set(hf) and all(torch.equal(sd[k], hf[k]) for k in hf)
    assert original_to_hf(hf_to_original(hf)).keys() == hf.keys()
    proj = torch.load(os.path.join(tiny_original, "mm_projector.bin"), weights_only=True)
    assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                            "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert torch.equal(proj["model.mm_projector.2.weight"], hf["model.multi_modal_projector.linear_2.weight"])


def test_projector_names_are_recognised():
    from mysproj.models.conversion import projector_to_hf

    t = {n: torch.zeros(1) for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    want = {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
            "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"}
    assert set(projector_to_hf(t)) == want
    assert set(projector_to_hf({"model.mm_projector." + k: v for k, v in t.items()})) == want
    legacy = {"multi_modal_projector.linear_1.weight": 0, "multi_modal_projector.linear_1.bias": 0,
              "multi_modal_projector.linear_2.weight": 0, "multi_modal_projector.linear_2.bias": 0}
    assert set(projector_to_hf(legacy)) == want
    with pytest.raises(KeyError):
        projector_to_hf({"0.weight": 0})


def test_bad_model_folders_fail_with_one_line(tiny_model, tiny_original, tmp_path, capsys):
    from mysproj.cli import main
    from mysproj.errors import BadInput
    from mysproj.models.loading import load_llava

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(tiny_model, "config.json"), no_weights / "config.json")
    with pytest.raises(BadInput, match="no model weights"):
        load_llava(str(no_weights))
    with pytest.raises(BadInput, match="no config.json"):
        load_llava(str(tmp_path))
    no_tower = tmp_path / "no-tower"
    shutil.copytree(tiny_original, no_tower)
    shutil.rmtree(no_tower / "vision_tower")
    with pytest.raises(BadInput, match="vision tower"):
        load_llava(str(no_tower))
    assert load_llava(str(no_tower), vision_tower=os.path.join(tiny_original, "vision_tower")).layout == "original"
    rc = main(["merge", "--base", str(no_weights), "--projector", os.path.join(tiny_original, "mm_projector.bin"),
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 64 and err[-1].startswith("error: ") and "no model weights" in err[-1]
    assert weights(tiny_model)  # the fixture itself is intact


def test_original_layout_with_sentencepiece_tokenizer_model(tiny_original, tmp_path):
    """As released (liuhaotian/llava-v1.5-7b): only `tokenizer.model` (SentencePiece), no tokenizer.json."""
    import io

    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from mysproj.models.loading import load_llava
    from mysproj.models.tokenizer import _CORPUS

    folder = tmp_path / "llava-v1.5-spm"
    shutil.copytree(tiny_original, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(folder / name)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=buf,
                                   vocab_size=500, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    loaded = load_llava(str(folder))
    tok = loaded.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [500, 501]
    assert loaded.model.config.image_token_index == 500 and loaded.model.config.pad_token_id == 501
    ids = tok("USER: <image>\nWhich texture? ASSISTANT: brick</s>").input_ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(500) == 1 and tok.unk_token_id not in ids
