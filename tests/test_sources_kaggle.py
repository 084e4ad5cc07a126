"""kaggle:// origins through Kaggle's own client against a loopback Kaggle API (tests/kaggle_server.py)."""

from __future__ import annotations

import hashlib
import logging

import origin_archives as arch
import pytest

from mysproj.errors import BadInput
from mysproj.sources import download, parse, resolve, unpack

SMALL = {"chunk_size": 16 * 1024, "connections": 4, "retry_seconds": 5}


def test_resolve_pins_the_current_version(kaggle_server):
    kaggle_server.add_dataset("shubhamgoel27", "dermnet", 1, b"PK\x05\x06" + b"\0" * 18)
    kaggle_server.add_dataset("shubhamgoel27", "dermnet", 3, arch.dermnet_zip())
    o = resolve(parse("kaggle://shubhamgoel27/dermnet"))
    assert o.revision == "3" and o.pinned
    assert resolve(parse("kaggle://shubhamgoel27/dermnet/versions/1")).revision == "1"


def test_download_a_version_verified_by_md5_and_unpack(kaggle_server, tmp_path, caplog):
    data = arch.dermnet_zip()
    kaggle_server.add_dataset("shubhamgoel27", "dermnet", 2, data)
    with caplog.at_level(logging.DEBUG):
        rec = download(parse("kaggle://shubhamgoel27/dermnet"), str(tmp_path / "d"), **SMALL)
    assert rec["revision"] == "2" and rec["verified"] == "kaggle md5"
    assert rec["files"] == {"dermnet.zip": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    names = unpack(str(tmp_path / "d" / "dermnet.zip"), str(tmp_path / "u"))
    assert any(n.startswith("train/Acne and Rosacea Photos/") for n in names)
    assert any(n.startswith("test/Eczema Photos/") for n in names)
    assert kaggle_server.key not in caplog.text


def test_a_zip_that_does_not_match_kaggles_md5_is_refused(kaggle_server, tmp_path):
    path = kaggle_server.add_dataset("o", "d", 1, arch.dermnet_zip())
    good = kaggle_server.origin.file_headers[path]
    kaggle_server.origin.add(path, arch.dermnet_zip() + b"junk", headers=good)  # other bytes, the old md5
    with pytest.raises(BadInput, match="md5 mismatch"):
        download(parse("kaggle://o/d/versions/1"), str(tmp_path / "d"), **SMALL)
    assert not (tmp_path / "d" / "d.zip").exists()


def test_token_credentials(kaggle_server, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", kaggle_server.token)
    kaggle_server.add_dataset("o", "d", 1, arch.dermnet_zip())
    assert download(parse("kaggle://o/d/versions/1"), str(tmp_path / "d"), **SMALL)["revision"] == "1"


def test_missing_credentials_name_the_variables(kaggle_server, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    with pytest.raises(BadInput, match="KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY"):
        resolve(parse("kaggle://o/d"))


def test_wrong_credentials_and_missing_dataset(kaggle_server, monkeypatch):
    kaggle_server.add_dataset("o", "d", 1, arch.dermnet_zip())
    with pytest.raises(BadInput, match=r"kaggle://o/none: Kaggle has no dataset o/none"):
        resolve(parse("kaggle://o/none"))
    with pytest.raises(BadInput, match=r"version 7"):
        download(parse("kaggle://o/d/versions/7"), "/nonexistent-never-written", **SMALL)
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-123456")
    with pytest.raises(BadInput, match=r"Kaggle refused .*\(401\)") as e:
        resolve(parse("kaggle://o/d"))
    assert "wrong-key-123456" not in str(e.value)
