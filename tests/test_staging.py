"""Writing large stage outputs without extra copies: files staged inside a local output folder are handed over by
rename, every file is hashed once, and `uri.copy` links locally and copies server-side in an object store."""

import json
import os

import pytest

from mysproj.config.fields import load_config
from mysproj.config.stages import PrepConfig
from mysproj.storage import manifest as M
from mysproj.storage import uri as U


def _cfg(out):
    return load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": str(out)}, env={})


def _write_two(folder: str) -> None:
    os.makedirs(os.path.join(folder, "sub"))
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        f.write(os.urandom(3 << 20))
    with open(os.path.join(folder, "sub", "small.txt"), "w") as f:
        f.write("hello")


def test_local_staging_hands_files_over_by_rename(tmp_path):
    out_dir = tmp_path / "o"
    os.makedirs(out_dir / ".staging-left-by-a-killed-writer")
    inodes = {}

    def body(out):
        with out.staging() as folder:
            assert os.path.dirname(folder) == str(out_dir)
            _write_two(folder)
            inodes["big"] = os.stat(os.path.join(folder, "big.bin")).st_ino
            out.put_dir(folder, move=True)
        return {}

    m = M.run_stage("prep", _cfg(out_dir), body)
    assert os.stat(out_dir / "big.bin").st_ino == inodes["big"]  # renamed, not copied
    assert sorted(os.listdir(out_dir)) == ["_SUCCESS.json", "big.bin", "sub"]  # staging folders gone
    for name in ("big.bin", "sub/small.txt"):
        assert m["files"][name]["sha256"] == M.sha256_file(str(out_dir / name))
    assert m["files"]["big.bin"]["size"] == 3 << 20


def test_saved_state_dict_cast_per_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from mysproj.models.saving import save_state_dict

    g = torch.Generator().manual_seed(0)
    state = {f"model.language_model.w{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    state.update({"model.multi_modal_projector.linear_1.weight": torch.randn(8, 64, generator=g),
                  "model.vision_tower.ids": torch.arange(10)})
    files = save_state_dict(state, str(tmp_path), max_shard_bytes=20_000, dtype=torch.bfloat16)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    loaded = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert loaded[k].dtype == want.dtype and torch.equal(loaded[k], want), k
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in loaded.values())
    projector_file = index["weight_map"]["model.multi_modal_projector.linear_1.weight"]
    assert [k for k, f in index["weight_map"].items() if f == projector_file] == [
        "model.multi_modal_projector.linear_1.weight"]


def test_copy_links_local_files(tmp_path):
    src = tmp_path / "a" / "x.bin"
    os.makedirs(src.parent)
    src.write_bytes(b"weights")
    assert U.copy(str(src), str(tmp_path / "b" / "x.bin")) == "link"
    assert os.path.samefile(src, tmp_path / "b" / "x.bin")


@pytest.mark.s3
def test_copy_and_staging_in_an_object_store(s3_env, tmp_path):
    root = f"{s3_env.create_bucket('staging')}/{tmp_path.name}"
    src = tmp_path / "x.bin"
    src.write_bytes(b"weights" * 1000)
    assert U.copy(str(src), f"{root}/a/x.bin") == "transfer"
    assert U.copy(f"{root}/a/x.bin", f"{root}/b/x.bin") == "server"
    assert U.read_bytes(f"{root}/b/x.bin") == src.read_bytes()
    assert U.copy(f"{root}/b/x.bin", str(tmp_path / "back.bin")) == "transfer"
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()

    staged = []

    def body(out):
        with out.staging() as folder:
            staged.append(folder)
            _write_two(folder)
            out.put_dir(folder, move=True)
        return {}

    m = M.run_stage("prep", _cfg(f"{root}/o"), body)
    assert not os.path.exists(staged[0])
    inp = M.StageInput(f"{root}/o")
    assert inp.read_text("sub/small.txt") == "hello" and len(inp.read_bytes("big.bin")) == 3 << 20
    assert set(m["files"]) == {"big.bin", "sub/small.txt"}
