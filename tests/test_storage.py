import json
import os

import pytest

from mysproj.config.fields import load_config
from mysproj.config.stages import PrepConfig
from mysproj.errors import BadInput, IncompleteOutput
from mysproj.storage import manifest as M


def _cfg(out, **kw):
    return load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": str(out), **kw}, env={})


def test_manifest_is_written_last_and_lists_files(tmp_path):
    seen_during_body = []

    def body(out):
        out.write_text("a.txt", "hello")
        out.write_json("b.json", {"x": 1})
        seen_during_body.append(os.path.exists(tmp_path / "o" / M.MANIFEST))
        return {"n": 2}

    m = M.run_stage("prep", _cfg(tmp_path / "o"), body)
    assert seen_during_body == [False]
    on_disk = json.loads((tmp_path / "o" / M.MANIFEST).read_text())
    assert on_disk["files"]["a.txt"] == {"size": 5, "sha256": M.sha256_file(str(tmp_path / "o" / "a.txt"))}
    assert on_disk["config_hash"] == m["config_hash"] and on_disk["summary"]["n"] == 2
    assert on_disk["stage"] == "prep" and on_disk["started"] <= on_disk["finished"]


def test_failed_body_leaves_no_manifest_and_readers_refuse(tmp_path):
    def body(out):
        out.write_text("a.txt", "partial")
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError):
        M.run_stage("prep", _cfg(tmp_path / "o"), body)
    assert (tmp_path / "o" / "a.txt").exists()
    with pytest.raises(IncompleteOutput, match="no _SUCCESS.json"):
        M.StageInput(str(tmp_path / "o"))


def test_sha_mismatch_is_detected(tmp_path):
    M.run_stage("prep", _cfg(tmp_path / "o"), lambda out: out.write_text("a.txt", "hello") and None)
    (tmp_path / "o" / "a.txt").write_text("HELLO")
    inp = M.StageInput(str(tmp_path / "o"), expect_stage="prep")
    with pytest.raises(IncompleteOutput, match="sha256 does not match"):
        inp.read_text("a.txt")
    with pytest.raises(IncompleteOutput, match="sha256 does not match"):
        inp.local_path("a.txt")
    with pytest.raises(IncompleteOutput, match="expected finetune"):
        M.StageInput(str(tmp_path / "o"), expect_stage="finetune")


def test_same_config_is_skipped_and_other_config_reruns(tmp_path):
    calls = []

    def body(out):
        calls.append(out.hash)
        out.write_text("a.txt", str(len(calls)))

    first = M.run_stage("prep", _cfg(tmp_path / "o"), body)
    again = M.run_stage("prep", _cfg(tmp_path / "o", workers=4), body)  # operational knob: same hash
    assert again.get("skipped") and len(calls) == 1
    other = M.run_stage("prep", _cfg(tmp_path / "o", seed=9), body)
    assert len(calls) == 2 and not other.get("skipped") and other["config_hash"] != first["config_hash"]
    assert M.StageInput(str(tmp_path / "o")).read_text("a.txt") == "2"


@pytest.mark.parametrize("damage", [b"{\"stage\": \"prep\", \"fi", b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_manifest_is_an_incomplete_output_everywhere(tmp_path, caplog, damage):
    """One rule: a manifest that is not a JSON object counts as none. The stage runs again and replaces it, a
    reader of the output as an input refuses it, the report's walkers pass over it; a warning names the file."""
    from mysproj.report.gather import gather
    from mysproj.storage.digest import recorded

    out = tmp_path / "run" / "textures-mini" / "zero-shot" / "eval-clip"
    M.run_stage("prep", _cfg(out), lambda o: o.write_text("a.txt", "first") and None)
    (out / M.MANIFEST).write_bytes(damage)
    with caplog.at_level("WARNING", logger="mysproj.storage.manifest"):
        assert M.read_manifest(str(out)) is None
    assert "damaged" in caplog.text and M.MANIFEST in caplog.text
    with pytest.raises(IncompleteOutput, match="or a damaged one"):
        M.StageInput(str(out))
    assert recorded(str(tmp_path / "run")) == [] and gather([str(tmp_path / "run")]) == []
    again = M.run_stage("prep", _cfg(out), lambda o: o.write_text("a.txt", "second") and None)
    assert not again.get("skipped") and M.StageInput(str(out)).read_text("a.txt") == "second"


def test_a_stage_run_reads_its_output_manifest_before_and_once_more_under_its_lease(tmp_path, monkeypatch):
    """Before: a complete output is skipped without taking a lease. Under it: another writer may have finished it
    in between. `begin` reuses the second read."""
    reads = []
    real = M.read_manifest
    monkeypatch.setattr(M, "read_manifest", lambda uri: reads.append(uri) or real(uri))
    out = str(tmp_path / "o")
    M.run_stage("prep", _cfg(out), lambda o: o.write_text("a.txt", "1") and None)
    M.run_stage("prep", _cfg(out, seed=9), lambda o: o.write_text("a.txt", "2") and None)
    with pytest.raises(BadInput, match="holds a complete 'prep' output; refusing to overwrite it with finetune"):
        M.run_stage("finetune", _cfg(out), lambda o: None)
    assert reads == [out] * 6
    M.run_stage("prep", _cfg(out, seed=9), lambda o: None)  # complete: skipped, no lease
    assert reads == [out] * 7


@pytest.mark.s3
def test_the_s3_test_server_has_a_volume_for_every_bucket_the_suite_makes(s3_env):
    """weed sizes its volume count from free disk by default: 16 on a runner with 16 GiB free, one per bucket,
    so the suite's later S3 tests failed with InternalError ("No writable volumes") on a fuller disk."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{s3_env.ports['master.port']}/dir/status") as r:
        topology = json.load(r)["Topology"]
    assert topology["Max"] >= 200, topology
    fs = s3_env.filesystem()
    for i in range(3):
        bucket = f"volumes-{i}"
        fs.mkdir(bucket)
        fs.pipe(f"{bucket}/x", b"written")
        assert fs.cat(f"{bucket}/x") == b"written"
