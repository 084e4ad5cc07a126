"""merge: a tuned projector into its base, either layout in, HF layout out, every other tensor bit-equal."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _models_fixtures import finetune, prep, stage, tiny_model, tiny_original, weights  # noqa: E402,F401

PROJ = ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]


def _tuned_projector(base_weights):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(base_weights[k].shape, generator=g) for k in PROJ}


def test_merge_original_base_with_bare_mm_projector_bin(tiny_model, tiny_original, tmp_path):  # noqa: F811
    from transformers import LlavaForConditionalGeneration

    from mysproj.models.conversion import (
        PROJECTOR_HF_TO_ORIGINAL,
        PROJECTOR_ORIGINAL_TO_HF,
        hf_to_original,
        split_original,
    )
    from mysproj.models.loading import load_llava, write_original

    hf_base = weights(tiny_model)
    tuned = _tuned_projector(hf_base)
    bin_path = str(tmp_path / "mm_projector.bin")
    torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: v for k, v in tuned.items()}, bin_path)
    out = str(tmp_path / "merged")
    m = stage("merge", base=tiny_original, projector=bin_path, out=out)
    assert m["summary"]["base_layout"] == "original" and m["summary"]["replaced"] == sorted(PROJ)

    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = model.state_dict()
    for k in hf_base:
        assert torch.equal(merged[k], tuned[k] if k in tuned else hf_base[k]), k
    orig = torch.load(os.path.join(out, "mm_projector.bin"), weights_only=True)
    assert torch.equal(orig["model.mm_projector.0.weight"], tuned[PROJ[0]])

    # ... and back to the original layout: the base's original tensors, with only the projector replaced
    loaded = load_llava(out)
    back = str(tmp_path / "back")
    write_original(loaded.model.state_dict(), loaded.model.config, loaded.tokenizer, loaded.image_processor, back)
    original_base, _ = split_original(hf_to_original(hf_base))
    original_back = weights(back)
    assert set(original_back) == set(original_base)
    for k, v in original_base.items():
        if "mm_projector" in k:
            assert torch.equal(original_back[k], tuned[PROJECTOR_ORIGINAL_TO_HF[k]]), k
        else:
            assert torch.equal(original_back[k], v), k


def test_merge_finetune_output_into_hf_base(tiny_model, prep, tmp_path):  # noqa: F811
    ft = str(tmp_path / "ft")
    finetune(tiny_model, prep, ft, strategy="projector", max_steps=1)
    out = str(tmp_path / "merged")
    stage("merge", base=tiny_model, projector=ft, out=out)
    base, proj, merged = weights(tiny_model), weights(ft), weights(out)
    assert set(merged) == set(base)
    for k in base:
        assert torch.equal(merged[k], proj[k] if k in proj else base[k]), k
    manifest = json.load(open(os.path.join(out, "_SUCCESS.json")))
    assert manifest["summary"]["random_weights"] is True and "model.safetensors" in manifest["files"]


def test_merge_rejects_mismatched_or_missing_projector(tiny_model, tmp_path, capsys):  # noqa: F811
    from mysproj.cli import main

    bad = str(tmp_path / "bad.bin")
    torch.save({"model.mm_projector.0.weight": torch.zeros(3, 3), "model.mm_projector.0.bias": torch.zeros(3),
                "model.mm_projector.2.weight": torch.zeros(3, 3), "model.mm_projector.2.bias": torch.zeros(3)}, bad)
    for projector, want in ((bad, "has shape"), (str(tmp_path / "missing.bin"), "no such projector file"),
                            (str(tmp_path), "not a finetune output")):
        rc = main(["merge", "--base", tiny_model, "--projector", projector, "--out", str(tmp_path / "o")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc == 64 and len(err) == 1 and want in err[0], err
