"""Model weights through the bucket: concurrent ranged GETs verified per part, read straight into memory (no copy
in the local cache), multipart uploads recording part digests, a corrupt part refused, a connection cut mid-part
resumed, and merge's server-side copies, each against a real S3 server (SeaweedFS), a real proxy in front of it
where the network has to misbehave."""

import os

import pytest
from cutting_proxy import CuttingProxy
from stage_runs import stage, tiny_in_shards

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.s3
PART_MIB = "0.03125"  # 32 KiB parts: the tiny model's 200 kB shards are several parts each


@pytest.fixture
def small_parts(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MYSPROJ_S3_PART_MIB", PART_MIB)
    monkeypatch.setenv("MYSPROJ_S3_CONNECTIONS", "4")
    monkeypatch.setenv("MYSPROJ_STORAGE_RETRY_SECONDS", "20")
    monkeypatch.setenv("MYSPROJ_CACHE_DIR", str(tmp_path / "cache"))
    return s3_env


@pytest.fixture
def s3_model(small_parts, tmp_path):
    """The tiny model written in shards into the bucket by model-init (multipart uploads with part digests)."""
    uri = f"{small_parts.create_bucket('weights')}/{tmp_path.name}/tiny"
    tiny_in_shards(uri)
    return uri


def _weights(uri):
    from mysproj.models.loading import load_llava

    return load_llava(uri).model.state_dict()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _shards(uri):
    from mysproj.storage.manifest import StageInput

    inp = StageInput(uri)
    return inp, sorted(n for n in inp.files if n.endswith(".safetensors"))


def test_a_model_in_the_bucket_loads_the_same_tensors_without_a_local_copy(s3_model, tiny_sharded, tmp_path):
    inp, shards = _shards(s3_model)
    assert inp.manifest["summary"]["time"]["transfer_out_s"] > 0  # model-init's uploads, timed apart
    big = [s for s in shards if inp.files[s]["size"] > 32 * 1024]
    assert len(big) > 2 and all(len(inp.files[s]["parts"]["sha256"]) > 1 for s in big)
    _same(_weights(s3_model), _weights(tiny_sharded))
    cached = {f for _, _, files in os.walk(tmp_path / "cache") for f in files}
    assert cached and not cached & {inp.files[s]["sha256"] for s in shards}  # config and tokenizer only


def test_the_probes_vision_only_load_streams_too(s3_model, tiny_sharded, tmp_path):
    from mysproj.models.vision_only import load_vision

    inp, shards = _shards(s3_model)
    got, want = (load_vision(u).model for u in (s3_model, tiny_sharded))
    for part in ("vision_tower", "multi_modal_projector"):
        _same(getattr(got.model, part).state_dict(), getattr(want.model, part).state_dict())
    cached = {f for _, _, files in os.walk(tmp_path / "cache") for f in files}
    assert not cached & {inp.files[s]["sha256"] for s in shards}


def test_a_corrupt_part_is_refused_naming_the_shard(s3_model, small_parts):
    from mysproj.errors import IncompleteOutput

    inp, shards = _shards(s3_model)
    shard = shards[1]
    fs = small_parts.filesystem()
    key = inp.path(shard)[len("s3://"):]
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 1  # same size: only the part's digest can tell
    fs.pipe_file(key, bytes(data))
    with pytest.raises(IncompleteOutput) as e:
        _weights(s3_model)
    line = str(e.value)
    assert "\n" not in line and shard in line and "does not match the sha256" in line and "part " in line


def test_a_connection_cut_mid_part_is_resumed(s3_model, small_parts, tiny_sharded, monkeypatch):
    host, port = small_parts.endpoint.split("//")[1].split(":")
    proxy = CuttingProxy((host, int(port)), cuts=3, cut_after=12_000)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        got = _weights(s3_model)
    finally:
        proxy.close()
    assert proxy.cut == 3
    _same(got, _weights(tiny_sharded))


def test_merge_copies_the_unchanged_shards_inside_the_bucket(s3_model, small_parts, tiny_sharded, tmp_path,
                                                            monkeypatch):
    from test_merge import _bare_projector

    inp, shards = _shards(s3_model)
    projector = _bare_projector(tiny_sharded, tmp_path / "mm_projector.bin")
    host, port = small_parts.endpoint.split("//")[1].split(":")
    proxy = CuttingProxy((host, int(port)))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        m = stage("merge", base=s3_model, projector=str(projector), out=f"{s3_model}-merged")
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", small_parts.endpoint)
    reused = m["summary"]["reused"]
    assert reused["by"] == ["server"] and reused["files"] >= len(shards) - 1
    # the reused shards' bytes never passed through this machine: everything carried is less than them
    assert proxy.sent + proxy.received < reused["bytes"]
    merged, _ = _shards(f"{s3_model}-merged")
    for name in shards:
        if name not in m["summary"]["rewritten"]:
            assert merged.files[name] == inp.files[name]  # parts digests carried with the copy
    _weights(f"{s3_model}-merged")



def test_bench_weights_reports_each_leg(tmp_path, capsys, monkeypatch, own_s3_server_env):
    """`mysproj bench weights` on the CPU: its own S3 server, every leg measured, the server gone afterwards."""
    import json

    from mysproj import cli
    out = tmp_path / "weights.json"
    assert cli.main(["bench", "weights", "--preset", "tiny", "--device", "cpu", "--repeat", "1",
                     "--work", str(tmp_path / "work"), "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["measure"].split(" (")[0].split(",")[0] for r in rows] == [
        "loopback TCP", "upload", "bucket -> host memory", "bucket -> host memory"]
    assert all(r["GB"] > 0 and r["GB_per_s"] > 0 for r in rows)
    assert "GB/s" in capsys.readouterr().out and not (tmp_path / "work").exists()
    assert "AWS_ENDPOINT_URL" not in os.environ
