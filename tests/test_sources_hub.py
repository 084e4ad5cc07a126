"""hf:// origins against a real hub endpoint (olah on loopback, tests/hub_server.py), and the hub's refusals
(gated, revision not found) from a loopback server that answers as the hub does."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from mysproj.errors import BadInput
from mysproj.sources import download, parse, resolve

FILES = {"config.json": b'{"model_type": "llava"}', "tokenizer.model": os.urandom(5000),
         "weights/model-00001-of-00002.bin": os.urandom(300_000), "README.md": b"# tiny\n"}
SMALL = {"chunk_size": 64 * 1024, "connections": 4, "retry_seconds": 5}


def test_resolve_pins_branch_and_default_to_full_commit(hf_hub):
    first = hf_hub.add_repo("liuhaotian/llava-v1.5-7b", FILES)
    second = hf_hub.add_repo("liuhaotian/llava-v1.5-7b", {**FILES, "config.json": b"{}"})
    dev = hf_hub.add_repo("liuhaotian/llava-v1.5-7b", {"x.txt": b"x"}, branch="dev")
    plain = resolve(parse("hf://liuhaotian/llava-v1.5-7b"))
    assert plain.revision == second and plain.pinned and first != second
    assert resolve(parse("hf://liuhaotian/llava-v1.5-7b@dev")).revision == dev
    assert resolve(parse(f"hf://liuhaotian/llava-v1.5-7b@{first}")).revision == first
    assert plain.key() != resolve(parse("hf://liuhaotian/llava-v1.5-7b@dev")).key()


def test_download_a_model_at_a_commit_verified(hf_hub, tmp_path):
    old = hf_hub.add_repo("llava-hf/llava-1.5-7b-hf", FILES)
    hf_hub.add_repo("llava-hf/llava-1.5-7b-hf", {**FILES, "config.json": b'{"changed": true}'})
    rec = download(parse(f"hf://llava-hf/llava-1.5-7b-hf@{old}"), str(tmp_path / "m"), **SMALL)
    for rel, data in FILES.items():
        assert (tmp_path / "m" / rel).read_bytes() == data
    assert rec["revision"] == old and rec["verified"] == "git blob oid"
    assert rec["files"]["tokenizer.model"] == {"size": 5000,
                                               "sha256": hashlib.sha256(FILES["tokenizer.model"]).hexdigest()}
    assert rec["bytes_total"] == sum(map(len, FILES.values()))


def test_include_and_exclude_pick_the_files(hf_hub, tmp_path):
    hf_hub.add_repo("openai/clip-vit-large-patch14-336", {**FILES, "tf_model.h5": b"tf", "flax_model.msgpack": b"f"})
    rec = download(parse("hf://openai/clip-vit-large-patch14-336#exclude=*.h5,*.msgpack"), str(tmp_path / "c"),
                   **SMALL)
    assert sorted(rec["files"]) == sorted(FILES)
    with pytest.raises(BadInput, match="no file .* matches include=\\*.safetensors"):
        download(parse("hf://openai/clip-vit-large-patch14-336#include=*.safetensors"), str(tmp_path / "n"), **SMALL)


def test_download_a_dataset_repo_resolving_main(hf_hub, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_notarealtoken_0123456789")
    sha = hf_hub.add_repo("QCRI/CrisisMMD", {"data/train.tsv": b"a\tb\n"}, repo_type="dataset")
    with caplog.at_level(logging.DEBUG):
        rec = download(parse("hf://datasets/QCRI/CrisisMMD"), str(tmp_path / "d"), **SMALL)
    assert rec["revision"] == sha and (tmp_path / "d" / "data" / "train.tsv").read_bytes() == b"a\tb\n"
    assert "hf_notarealtoken" not in caplog.text


def test_missing_repo_is_one_line(hf_hub, tmp_path):
    with pytest.raises(BadInput, match=r"hf://org/none: model repository org/none not found at http://127"):
        resolve(parse("hf://org/none"))


# ------------------------------------------------------------------- a loopback server answering as the hub

def _fake_hub(origin, monkeypatch, repo="org/m", files=None, lfs=False):
    """Serve repo info, tree and files for `repo` from the http_origin server (Range honoured)."""
    sha = "a" * 40
    files = files or {"w.bin": os.urandom(200_000)}
    origin.add(f"api/models/{repo}/revision/main", json.dumps({"id": repo, "sha": sha, "siblings": []}).encode())
    tree = []
    for path, data in files.items():
        entry = {"type": "file", "path": path, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        tree.append(entry)
        origin.add(f"{repo}/resolve/{sha}/{path}", data)
    origin.add(f"api/models/{repo}/tree/{sha}", json.dumps(tree).encode())
    monkeypatch.setenv("HF_ENDPOINT", origin.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return sha, files


def test_lfs_files_are_verified_by_sha256_in_ranges_with_the_token_sent(http_origin, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_the_test_42")
    sha, files = _fake_hub(http_origin, monkeypatch, lfs=True)
    rec = download(parse("hf://org/m"), str(tmp_path / "m"), **SMALL)
    assert (tmp_path / "m" / "w.bin").read_bytes() == files["w.bin"] and rec["verified"] == "hub lfs sha256"
    assert rec["revision"] == sha
    ranged = [r for _, p, r in http_origin.requests if p.endswith("/w.bin") and r and r != "bytes=0-1023"]
    assert len(ranged) == 4  # 200,000 bytes in 64 KiB ranges
    assert http_origin.authorizations and set(http_origin.authorizations) == {"Bearer hf_secret_for_the_test_42"}


def test_a_file_that_does_not_match_the_hub_digest_is_refused(http_origin, monkeypatch, tmp_path):
    sha, files = _fake_hub(http_origin, monkeypatch, lfs=True)
    http_origin.add(f"org/m/resolve/{sha}/w.bin", os.urandom(200_000))  # same size, other bytes
    with pytest.raises(BadInput, match=r"hf://org/m: w.bin: sha256 mismatch"):
        download(parse("hf://org/m"), str(tmp_path / "m"), **SMALL)
    assert not (tmp_path / "m" / "w.bin").exists()


@pytest.mark.parametrize("code, error_code, needle", [
    (403, "GatedRepo", "gated repository; accept its terms .* set HF_TOKEN"),
    (404, "RevisionNotFound", "revision 'main' not found in org/gated"),
    (401, None, r"refused access \(401\); set HF_TOKEN")])
def test_hub_refusals(http_origin, monkeypatch, code, error_code, needle):
    monkeypatch.setenv("HF_ENDPOINT", http_origin.endpoint)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    name = "api/models/org/gated/revision/main"
    http_origin.faults.status[name] = code
    if error_code:
        http_origin.faults.headers[name] = {"X-Error-Code": error_code, "X-Error-Message": "refused"}
    with pytest.raises(BadInput, match=needle):
        resolve(parse("hf://org/gated"))


def test_a_restart_reassembles_finished_files_from_parts(http_origin, monkeypatch, tmp_path):
    """The pod dies on the second file: the first one's verified parts stay, so a new pod (empty local folder)
    rebuilds it from them and fetches only what is missing."""
    files = {"a.bin": os.urandom(150_000), "b.bin": os.urandom(150_000)}
    sha, _ = _fake_hub(http_origin, monkeypatch, files=files, lfs=True)
    parts = str(tmp_path / "parts")
    http_origin.faults.status[f"org/m/resolve/{sha}/b.bin"] = 404
    with pytest.raises(BadInput, match="b.bin"):
        download(parse("hf://org/m"), str(tmp_path / "pod1"), parts_uri=parts, **SMALL)
    del http_origin.faults.status[f"org/m/resolve/{sha}/b.bin"]
    before = http_origin.served(f"org/m/resolve/{sha}/a.bin")
    rec = download(parse("hf://org/m"), str(tmp_path / "pod2"), parts_uri=parts, **SMALL)
    assert http_origin.served(f"org/m/resolve/{sha}/a.bin") - before == 1024  # the size probe only
    assert all((tmp_path / "pod2" / k).read_bytes() == v for k, v in files.items())
    assert rec["bytes_fetched"] == 1024 + 1024 + 150_000
    assert not os.path.exists(parts) or not os.listdir(parts)
