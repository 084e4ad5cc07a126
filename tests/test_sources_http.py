"""The ranged, resumable HTTP download engine against a real loopback server (tests/http_origin.py)."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

from mysproj.errors import BadInput
from mysproj.sources import download, parse, verify
from mysproj.storage import uri as storage

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 64 * 1024
SMALL = {"chunk_size": CHUNK, "connections": 4, "retry_seconds": 20}
PROBE = "bytes=0-1023"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fetch(url: str, dest, parts=None, **kw):
    return download(parse(url), str(dest), parts_uri=parts, **{**SMALL, **kw})


def _ranges(origin, name):
    return [r for _, p, r in origin.requests if p == f"/{name}" and r != PROBE]


def test_pinned_download_in_parallel_ranges(http_origin, tmp_path):
    url = http_origin.add("dtd-r1.0.1.tar.gz", DATA)
    rec = _fetch(f"{url}#sha256={SHA}", tmp_path / "out")
    assert (tmp_path / "out" / "dtd-r1.0.1.tar.gz").read_bytes() == DATA
    assert rec["files"] == {"dtd-r1.0.1.tar.gz": {"size": len(DATA), "sha256": SHA}}
    assert rec["verified"] == "sha256 pin" and rec["bytes_total"] == len(DATA) and rec["revision"] is None
    assert len(_ranges(http_origin, "dtd-r1.0.1.tar.gz")) == -(-len(DATA) // CHUNK)  # one request per chunk
    assert os.listdir(tmp_path / "out") == ["dtd-r1.0.1.tar.gz"]


def test_wrong_sha256_names_url_and_both_digests_and_leaves_nothing(http_origin, tmp_path):
    url = http_origin.add("x.tar.gz", DATA)
    wrong = "0" * 64
    parts = str(tmp_path / "parts")
    with pytest.raises(BadInput) as e:
        _fetch(f"{url}#sha256={wrong}&into=sub", tmp_path / "out", parts)
    msg = str(e.value)
    assert url in msg and wrong in msg and SHA in msg
    assert os.listdir(tmp_path / "out") == []
    assert not storage.exists(parts)  # the wrong bytes are not kept for a retry to reassemble


def _resume(origin, tmp_path, parts: str):
    url = origin.add("big.bin", DATA)
    origin.faults.budget["big.bin"] = 3  # the probe and 2 ranges, then the server fails for good
    with pytest.raises(BadInput, match="kept failing"):
        _fetch(url, tmp_path / "out", parts, retry_seconds=0, connections=1)
    kept = [p for p in storage.list_files(parts) if p.isdigit()]
    assert kept == ["000000", "000001"]
    assert not os.path.exists(tmp_path / "out" / "big.bin")
    del origin.faults.budget["big.bin"]
    before = origin.served("big.bin")
    rec = _fetch(f"{url}#sha256={SHA}", tmp_path / "out", parts)
    second = origin.served("big.bin") - before
    assert (tmp_path / "out" / "big.bin").read_bytes() == DATA
    assert second == len(DATA) - 2 * CHUNK + 1024  # only the missing ranges (and the probe)
    assert rec["bytes_fetched"] == second
    assert not [p for p in storage.list_files(parts) if p.endswith(("0", "1", ".json"))]  # gone once verified


def test_resume_fetches_only_missing_parts(http_origin, tmp_path):
    _resume(http_origin, tmp_path, str(tmp_path / "parts"))


@pytest.mark.s3
def test_resume_with_parts_in_s3(http_origin, tmp_path, s3_env):
    bucket = s3_env.create_bucket("fetch-parts")
    _resume(http_origin, tmp_path, f"{bucket}/sources/big/parts")


def test_parts_of_another_file_are_not_reused(http_origin, tmp_path):
    parts = str(tmp_path / "parts")
    other = os.urandom(len(DATA))
    url = http_origin.add("f.bin", other)
    http_origin.faults.budget["f.bin"] = 3
    with pytest.raises(BadInput):
        _fetch(url, tmp_path / "out", parts, retry_seconds=0, connections=1)
    del http_origin.faults.budget["f.bin"]
    http_origin.add("f.bin", DATA + b"x")  # the origin changed size: the old parts must not be used
    _fetch(url, tmp_path / "out", parts)
    assert (tmp_path / "out" / "f.bin").read_bytes() == DATA + b"x"


def test_connection_dropped_mid_chunk_is_resumed_from_where_it_stopped(http_origin, tmp_path):
    url = http_origin.add("d.bin", DATA)
    http_origin.faults.drop("d.bin", after=5000)  # the probe (1024 bytes) then a closed connection
    http_origin.faults.drop("d.bin", after=7000)  # hits the first range
    _fetch(f"{url}#sha256={SHA}", tmp_path / "out", connections=1)
    assert (tmp_path / "out" / "d.bin").read_bytes() == DATA
    assert f"bytes=7000-{CHUNK - 1}" in _ranges(http_origin, "d.bin")


def test_5xx_is_retried_then_succeeds(http_origin, tmp_path):
    url = http_origin.add("r.bin", DATA)
    http_origin.faults.fail("r.bin", 500, times=1)
    http_origin.faults.fail("r.bin", 503, times=1)
    _fetch(f"{url}#sha256={SHA}", tmp_path / "out")
    assert (tmp_path / "out" / "r.bin").read_bytes() == DATA


def test_retry_budget_is_bounded(http_origin, tmp_path):
    url = http_origin.add("down.bin", DATA)
    http_origin.faults.fail("down.bin", 502, times=1000)
    with pytest.raises(BadInput, match=r"kept failing for 1s .*retry later"):
        _fetch(url, tmp_path / "out", retry_seconds=1)


@pytest.mark.parametrize("code", [401, 403, 404, 410])
def test_refusals_are_bad_input_at_once(http_origin, tmp_path, code):
    url = http_origin.add("secret.zip", DATA)
    http_origin.faults.status["secret.zip"] = code
    with pytest.raises(BadInput) as e:
        _fetch(url, tmp_path / "out")
    assert url in str(e.value) and str(code) in str(e.value)
    assert ("credentials" if code in (401, 403) else "check the URL") in str(e.value)
    assert len(http_origin.requests) == 1  # not retried


def test_html_page_instead_of_the_file(http_origin, tmp_path):
    url = http_origin.add("CrisisMMD_v2.0.tar.gz", DATA)
    http_origin.faults.html.add("CrisisMMD_v2.0.tar.gz")
    with pytest.raises(BadInput, match="the server sent an HTML page, not the file"):
        _fetch(url, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_html_body_without_html_content_type(http_origin, tmp_path):
    url = http_origin.add("page.zip", b"\n  <!DOCTYPE html><html>login</html>" + b" " * 5000)
    with pytest.raises(BadInput, match="HTML page"):
        _fetch(url, tmp_path / "out")


def test_server_without_range_gives_one_stream(http_origin, tmp_path):
    url = http_origin.add("plain.bin", DATA)
    http_origin.faults.no_range.add("plain.bin")
    http_origin.faults.drop("plain.bin", after=100_000, times=1)  # the stream breaks once: start again
    rec = _fetch(f"{url}#sha256={SHA}", tmp_path / "out")
    assert (tmp_path / "out" / "plain.bin").read_bytes() == DATA
    assert rec["bytes_fetched"] == 100_000 + len(DATA)


def test_unpinned_download_records_its_digest(http_origin, tmp_path):
    url = http_origin.add("u.bin", DATA)
    rec = _fetch(url, tmp_path / "out")
    assert rec["files"]["u.bin"]["sha256"] == SHA and rec["verified"].startswith("none")
    assert rec["etag"].startswith('"')


def test_empty_file(http_origin, tmp_path):
    url = http_origin.add("empty.txt", b"")
    rec = _fetch(url, tmp_path / "out")
    assert (tmp_path / "out" / "empty.txt").read_bytes() == b"" and rec["bytes_total"] == 0


def test_disk_full_names_folder_and_bytes(http_origin, tmp_path):
    url = http_origin.add("full.bin", DATA)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / ".full.bin.incomplete")  # every write there fails with ENOSPC
    with pytest.raises(BadInput) as e:
        _fetch(url, out)
    assert str(out) in str(e.value) and "disk full" in str(e.value) and f"{len(DATA) / 1e9:.2f} GB" in str(e.value)
    assert not os.path.exists(out / "full.bin")


def test_progress_lines(http_origin, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(verify, "PROGRESS_SECONDS", 0.0)
    url = http_origin.add("p.bin", DATA)
    with caplog.at_level(logging.INFO):
        _fetch(url, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "MB/s" in r.getMessage()]
    assert lines and all("/0.3 MB" in line and "ETA" in line for line in lines)


def test_a_killed_process_resumes_from_its_parts(http_origin, tmp_path):
    """A child process fetching the file is killed (SIGKILL, as a node loss would) after 2 ranges; this process
    then fetches only the ranges it did not finish."""
    import signal
    import subprocess
    import sys
    import time

    url = http_origin.add("killed.bin", DATA)
    parts = str(tmp_path / "parts")
    http_origin.faults.hold["killed.bin"] = 3  # the probe and 2 ranges, then the server hangs
    code = (f"from mysproj.sources import download, parse\n"
            f"download(parse({url!r}), {str(tmp_path / 'out')!r}, parts_uri={parts!r}, chunk_size={CHUNK}, "
            f"connections=1)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.monotonic() + 60
        while len([p for p in storage.list_files(parts) if p.isdigit()]) < 2:
            assert child.poll() is None and time.monotonic() < deadline, "the child never stored 2 ranges"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        http_origin.faults.release.set()
    del http_origin.faults.hold["killed.bin"]
    before = http_origin.served("killed.bin")
    _fetch(f"{url}#sha256={SHA}", tmp_path / "out", parts)
    assert (tmp_path / "out" / "killed.bin").read_bytes() == DATA
    assert http_origin.served("killed.bin") - before == len(DATA) - 2 * CHUNK + 1024


def test_a_verified_file_already_there_is_not_fetched_again(http_origin, tmp_path):
    url = http_origin.add("again.bin", DATA)
    _fetch(f"{url}#sha256={SHA}", tmp_path / "out")
    served = http_origin.bytes_served
    rec = _fetch(f"{url}#sha256={SHA}", tmp_path / "out")
    assert http_origin.bytes_served == served and rec["bytes_fetched"] == 0


def test_an_expired_signed_url_is_asked_for_again(http_origin, tmp_path):
    """Hubs and Kaggle redirect to signed storage URLs that expire: a 403 from the redirect target mid-download
    asks the origin for a new one instead of failing."""
    import urllib.parse

    state = {"sig": 0, "uses": 0}

    def link(handler, path, body):
        state["sig"], state["uses"] = state["sig"] + 1, 0
        handler.send_simple(302, b"", headers={"Location": f"{http_origin.endpoint}/signed/blob.bin?"
                                                           f"sig={state['sig']}"})
        return True

    def signed(handler, path, body):
        sig = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)["sig"][0]
        state["uses"] += 1
        if sig != str(state["sig"]) or state["uses"] > 3:  # a signature serves 3 requests
            handler.send_simple(403, b"<Error>expired</Error>")
        else:
            handler.send_file("signed/blob.bin", DATA, "GET", handler.headers.get("Range"))
        return True

    http_origin.routes += [("GET", "/link/", link), ("GET", "/signed/", signed)]
    rec = _fetch(f"{http_origin.endpoint}/link/blob.bin#sha256={SHA}", tmp_path / "out", connections=1)
    assert (tmp_path / "out" / "blob.bin").read_bytes() == DATA and rec["verified"] == "sha256 pin"
    assert state["sig"] >= 2


def test_a_small_file_comes_whole_with_the_probe(http_origin, tmp_path):
    url = http_origin.add("config.json", b'{"a": 1}')
    _fetch(url, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == b'{"a": 1}'
    assert [r for _, p, r in http_origin.requests] == [PROBE]
