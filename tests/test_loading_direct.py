"""Loading a model without extra work: weights read straight onto the target device equal the usual load, and
shards verified in parallel still catch a corrupt one."""

import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_direct_load_equals_the_usual_load(tiny_model, dtype):
    from mysproj.models.loading import load_llava

    usual = load_llava(tiny_model, dtype=dtype).model.state_dict()
    direct = load_llava(tiny_model, dtype=dtype, direct=True).model.state_dict()
    assert usual.keys() == direct.keys()
    for k, v in usual.items():
        assert v.dtype == direct[k].dtype and torch.equal(v, direct[k]), k


def test_a_corrupt_shard_is_caught(tmp_path, tiny_sharded):
    from mysproj.errors import IncompleteOutput
    from mysproj.models.loading import load_llava

    out = str(tmp_path / "sharded")
    shutil.copytree(tiny_sharded, out)
    load_llava(out)
    shard = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[2]
    with open(os.path.join(out, shard), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(IncompleteOutput, match=f"{shard}: sha256 does not match"):
        load_llava(out)
