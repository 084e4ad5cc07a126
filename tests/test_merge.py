"""merge: a tuned projector into its base, either layout in, HF layout out, every other tensor bit-equal."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import finetune, stage, tiny_in_shards, weights  # noqa: E402

PROJ = ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]


def _tuned_projector(base_weights):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(base_weights[k].shape, generator=g) for k in PROJ}


def test_merge_original_base_with_bare_mm_projector_bin(tiny_model, tiny_original, tmp_path):
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


def test_merge_finetune_output_into_hf_base(tiny_model, prep, tmp_path):
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


def test_merge_rejects_mismatched_or_missing_projector(tiny_model, tmp_path, capsys):
    from mysproj.cli import main

    bad = str(tmp_path / "bad.bin")
    torch.save({"model.mm_projector.0.weight": torch.zeros(3, 3), "model.mm_projector.0.bias": torch.zeros(3),
                "model.mm_projector.2.weight": torch.zeros(3, 3), "model.mm_projector.2.bias": torch.zeros(3)}, bad)
    (tmp_path / "plain").mkdir()
    for projector, want in ((bad, "has shape"), (str(tmp_path / "missing.bin"), "no such projector file"),
                            (str(tmp_path / "plain"), "not a finetune output")):
        rc = main(["merge", "--base", tiny_model, "--projector", projector, "--out", str(tmp_path / "o")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc == 64 and len(err) == 1 and want in err[0], err


def _sharded_base(out: str) -> str:
    """`out`, the tiny model in several shards (as a 7B model is), holds the projector in a shard of its own."""
    from mysproj.storage import read_text

    index = json.loads(read_text(f"{out}/model.safetensors.index.json"))["weight_map"]
    projector_file = {index[k] for k in PROJ}
    assert len(set(index.values())) > 3 and len(projector_file) == 1
    assert sorted(k for k, f in index.items() if f in projector_file) == sorted(PROJ)
    return out


def _bare_projector(base: str, path) -> str:
    from mysproj.models.conversion import PROJECTOR_HF_TO_ORIGINAL

    torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: v for k, v in _tuned_projector(weights(base)).items()}, str(path))
    return str(path)


def _same_model(a: str, b: str) -> None:
    """Two merge outputs hold the same tensors, load into equal models and both manifests hold true hashes."""
    from mysproj.models.loading import load_llava
    from mysproj.storage.manifest import StageInput

    sa, sb = load_llava(a).model.state_dict(), load_llava(b).model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for uri in (a, b):
        inp = StageInput(uri)
        for name in inp.files:
            inp.read_bytes(name)  # raises on a hash that does not match


@pytest.mark.parametrize("sharded", [True, False])
def test_merge_reusing_the_base_equals_the_full_write(tiny_model, tiny_sharded, tmp_path, sharded):
    from safetensors.torch import load_file

    base = _sharded_base(tiny_sharded) if sharded else tiny_model
    bin_path = _bare_projector(base, tmp_path / "mm_projector.bin")
    full, reused = str(tmp_path / "full"), str(tmp_path / "reused")
    stage("merge", base=base, projector=bin_path, out=full, reuse_base=False)
    m = stage("merge", base=base, projector=bin_path, out=reused)
    summary = m["summary"]
    assert summary["reused"]["by"] == ["link"] and summary["replaced"] == sorted(PROJ)
    merged, whole = weights(reused), weights(full)
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in merged)
    _same_model(reused, full)
    assert torch.equal(torch.load(os.path.join(reused, "mm_projector.bin"), weights_only=True)[
        "model.mm_projector.2.bias"], torch.load(os.path.join(full, "mm_projector.bin"), weights_only=True)[
        "model.mm_projector.2.bias"])
    (rewritten,) = summary["rewritten"]
    assert set(load_file(os.path.join(reused, rewritten))) == (set(PROJ) if sharded else set(merged))
    base_files = json.load(open(os.path.join(base, "_SUCCESS.json")))["files"]
    for name, entry in m["files"].items():
        if name in (rewritten, "mm_projector.bin"):
            continue
        assert os.path.samefile(os.path.join(reused, name), os.path.join(base, name)), name  # a hard link
        assert entry == base_files[name]
    assert set(m["files"]) == set(base_files) | {"mm_projector.bin"}
    if not sharded:  # the same files as the full write (which writes one file for the small model)
        assert set(m["files"]) == set(json.load(open(os.path.join(full, "_SUCCESS.json")))["files"])


def test_merge_reusing_rejects_a_projector_of_another_shape(tiny_model, tmp_path):
    from mysproj.errors import BadInput

    bad = str(tmp_path / "bad.bin")
    torch.save({"model.mm_projector.0.weight": torch.zeros(3, 3), "model.mm_projector.0.bias": torch.zeros(3),
                "model.mm_projector.2.weight": torch.zeros(3, 3), "model.mm_projector.2.bias": torch.zeros(3)}, bad)
    with pytest.raises(BadInput, match="has shape"):
        stage("merge", base=tiny_model, projector=bad, out=str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "_SUCCESS.json")


@pytest.mark.s3
def test_merge_reusing_copies_inside_the_object_store(s3_env, tiny_sharded, tmp_path):
    root = f"{s3_env.create_bucket('mergereuse')}/{tmp_path.name}"
    local_base = _sharded_base(tiny_sharded)
    base = f"{root}/models/tiny"
    tiny_in_shards(base)
    _sharded_base(base)
    bin_path = _bare_projector(local_base, tmp_path / "mm_projector.bin")
    m = stage("merge", base=base, projector=bin_path, out=f"{root}/merge")
    assert m["summary"]["reused"]["by"] == ["server"] and m["summary"]["reused"]["files"] > 3
    full = str(tmp_path / "full")
    stage("merge", base=local_base, projector=bin_path, out=full, reuse_base=False)
    _same_model(f"{root}/merge", full)


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_run_again_leaves_no_temporary_file(tiny_model, tiny_sharded, tmp_path, sharded):
    """merge re-run over its own output (`--force`, and a changed projector) with the base's files linked in:
    the output holds exactly its manifest's files, no `*.tmp-*` beside them."""
    from mysproj import cli

    base = _sharded_base(tiny_sharded) if sharded else tiny_model
    bin_path = _bare_projector(base, tmp_path / "mm_projector.bin")
    out = tmp_path / "merged"
    argv = ["merge", "--base", base, "--projector", bin_path, "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    assert cli.main([str(a) for a in argv + ["--force"]]) == 0
    torch.save({k: v + 1 for k, v in torch.load(bin_path, weights_only=True).items()}, bin_path)
    assert cli.main([str(a) for a in argv]) == 0
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted([*json.load(open(out / "_SUCCESS.json"))["files"], "_SUCCESS.json"])
