"""`github://OWNER/REPO@COMMIT`: a repository's files at one commit, from GitHub's archive of it.

GitHub makes its archives on request, so their bytes are not stable and no checksum of them can be pinned; the
files inside are. Each extracted file is verified against the commit's tree (its git blob id, sha1 of
`blob <size>\\0<content>`), which the API lists: every file of the tree must be there with that id, and nothing
else. `MYSPROJ_GITHUB_URL` / `MYSPROJ_GITHUB_API_URL` point at a mirror (and the tests at a loopback server);
`GITHUB_TOKEN`, if set, is sent to the API (rate limits), never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

from mysproj.errors import BadInput
from mysproj.sources import http
from mysproj.sources.unpack import unpack

log = logging.getLogger(__name__)
WEB = "https://github.com"
API = "https://api.github.com"
_SKIPPED_MODES = ("120000", "160000")  # symbolic links, submodules: not files in an archive to verify


def _urls(env: Mapping[str, str]) -> tuple[str, str]:
    return (env.get("MYSPROJ_GITHUB_URL") or WEB).rstrip("/"), (env.get("MYSPROJ_GITHUB_API_URL") or API).rstrip("/")


def _api_headers(env: Mapping[str, str]) -> dict:
    headers = {"Accept": "application/vnd.github+json"}
    if env.get("GITHUB_TOKEN"):
        headers["Authorization"] = f"Bearer {env['GITHUB_TOKEN']}"
    return headers


def _api_json(url: str, env: Mapping[str, str], what: str, **engine) -> dict:
    with tempfile.TemporaryDirectory(prefix="mysproj-github-") as tmp:
        eng = http.Engine(url, _api_headers(env), expect_binary=False, what=what, connections=1,
                          **{k: v for k, v in engine.items() if k == "retry_seconds"})
        eng.fetch(tmp, "answer.json", parts_uri=None)
        with open(os.path.join(tmp, "answer.json"), "rb") as f:
            try:
                return json.loads(f.read())
            except ValueError:
                raise BadInput(f"{what}: the API sent no JSON; check MYSPROJ_GITHUB_API_URL") from None


def resolve_commit(origin, *, env: Mapping[str, str] = os.environ) -> str:
    """The full commit a branch or tag names now."""
    _, api = _urls(env)
    ref = origin.revision or "HEAD"
    answer = _api_json(f"{api}/repos/{origin.repo}/commits/{ref}", env, f"github://{origin.repo}@{ref}")
    sha = str(answer.get("sha") or "")
    if len(sha) != 40:
        raise BadInput(f"github://{origin.repo}@{ref}: the API named no commit for it")
    return sha


def blob_id(path: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(origin, dest: str, *, parts_uri: str | None, env: Mapping[str, str] = os.environ,
             log: logging.Logger = log, **engine) -> dict:
    """The repository at `origin.revision` (a full commit) unpacked into `dest/<REPO>-<commit>/`, every file
    verified against the commit's tree before this returns."""
    t0 = time.monotonic()
    web, api = _urls(env)
    what = f"github://{origin.repo}@{origin.revision}"
    tree = _api_json(f"{api}/repos/{origin.repo}/git/trees/{origin.revision}?recursive=1", env, what, **engine)
    if tree.get("truncated"):
        raise BadInput(f"{what}: the API listed the tree only in part (too many files); fetch this repository "
                       f"another way (an https:// archive with #sha256)")
    expected = {e["path"]: e["sha"] for e in tree.get("tree", [])
                if e.get("type") == "blob" and e.get("mode") not in _SKIPPED_MODES}
    name = f"{origin.repo.split('/')[1]}-{origin.revision}"
    with tempfile.TemporaryDirectory(prefix="mysproj-github-", dir=dest) as tmp:
        eng = http.Engine(f"{web}/{origin.repo}/archive/{origin.revision}.zip", what=what, log=log, **engine)
        fetched = eng.fetch(tmp, "archive.zip", parts_uri=parts_uri)
        unpacked = os.path.join(tmp, "unpacked")
        unpack(os.path.join(tmp, "archive.zip"), unpacked)
        tops = os.listdir(unpacked)
        if len(tops) != 1 or not os.path.isdir(os.path.join(unpacked, tops[0])):
            raise BadInput(f"{what}: the archive does not hold one top folder (it holds {sorted(tops)[:5]})")
        top = os.path.join(unpacked, tops[0])
        _verify(what, top, expected)
        shutil.move(top, os.path.join(dest, name))
    seconds = time.monotonic() - t0
    return {"origin": f"github://{origin.repo}", "revision": origin.revision,
            "files": {"archive.zip": {"size": fetched.size, "sha256": fetched.sha256}},
            "bytes_fetched": fetched.bytes_fetched, "bytes_total": fetched.size, "seconds": round(seconds, 3),
            "mb_per_s": round(fetched.bytes_fetched / 1e6 / max(seconds, 1e-9), 2),
            "verified": f"git blob ids of the commit's tree ({len(expected)} files)"}


def _verify(what: str, top: str, expected: dict[str, str]) -> None:
    found = set()
    for root, _, names in os.walk(top):
        for n in names:
            path = os.path.join(root, n)
            rel = os.path.relpath(path, top).replace(os.sep, "/")
            found.add(rel)
            if rel not in expected:
                raise BadInput(f"{what}: the archive holds '{rel}', which the commit's tree does not list")
            if blob_id(path) != expected[rel]:
                raise BadInput(f"{what}: '{rel}' differs from the commit's file (git blob {expected[rel][:12]}); "
                               f"the archive is corrupt or not this commit's")
    missing = sorted(set(expected) - found)
    if missing:
        raise BadInput(f"{what}: {len(missing)} file(s) of the commit are missing from the archive, e.g. "
                       f"'{missing[0]}'")
