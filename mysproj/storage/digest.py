"""Content digests, so that a stage's key covers what its inputs hold and not only where they are.

What an input URI's digest is made of:
- a stage output (a folder with `_SUCCESS.json`): the `digest` its manifest records (sha256 over its files' names,
  sizes and sha256): one manifest read;
- a folder holding stage outputs below it (a run root given to `report`): the digests of the top-most manifests
  below it, by relative path;
- anything else (a downloaded model, a raw dataset, one file): every file's relative name, size and content hash.
  Local files are hashed once and remembered by (path, size, mtime, ctime, inode) in `<cache>/file-hashes.sqlite`,
  so an unchanged multi-GB model is not read again; object stores give an ETag per object, taken as its content hash
  (nothing is downloaded).

`None` stands for "nothing stored there": an input that is gone cannot be compared, and nothing could be re-made
from it either, so it never counts as changed (a raw dataset deleted after prep keeps its prep output).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator

from mysproj.errors import BadInput
from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.config_key import input_fields

log = logging.getLogger(__name__)
MANIFEST = "_SUCCESS.json"
_TAG_KEYS = ("ETag", "etag", "md5", "md5Hash", "crc32c", "checksum")


def content_digest(files: dict[str, dict]) -> str:
    """The digest a manifest records: sha256 over its files' names, sizes and sha256, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\t{files[name]['size']}\t{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    return manifest.get("digest") or content_digest(manifest.get("files", {}))


def _digest_lines(lines: Iterator[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def read_manifest(out_uri: str) -> dict | None:
    """The manifest of the output at `out_uri`, or None where the output is not complete. The one rule for a
    damaged manifest (not a JSON object: a torn write by another tool, a damaged object) is the rule for a missing
    one: the output is incomplete. Its stage runs again and replaces it; readers of it as an input refuse it;
    the report, the run state and the planner pass over it. A warning names the file."""
    target = U.join(out_uri, MANIFEST)
    if not U.exists(target):
        return None
    try:
        manifest = json.loads(U.read_bytes(target))
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict):
        log.warning("%s: damaged (not a JSON object); the output counts as incomplete and its stage runs again",
                    target)
        return None
    return manifest


def recorded(root: str) -> list[tuple[str, dict]]:
    """(folder relative to `root`, manifest) of every complete stage output below `root`, in path order."""
    found = []
    for rel in U.list_files(root):
        if rel == MANIFEST or rel.endswith("/" + MANIFEST):
            folder = rel[: -len(MANIFEST)].rstrip("/")
            manifest = read_manifest(U.join(root, folder) if folder else root)
            if manifest is not None:
                found.append((folder, manifest))
    return found


def _listing(uri: str, exclude: str | None) -> dict[str, dict]:
    """{relative name: {"size", "path", "tag"}} of every file at or below `uri`, `exclude` and what is below it left
    out. `tag` is the object store's content tag (None for local files)."""
    fs, path = U.split(uri)
    skip = U.split(exclude)[1].rstrip("/") + "/" if exclude else None
    if U.is_local(uri):
        if os.path.isfile(path):
            return {os.path.basename(path): {"size": os.path.getsize(path), "path": path, "tag": None}}
        found = {}
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in names:
                full = os.path.join(root, n)
                if skip and (full + "/").startswith(skip) or not os.path.isfile(full):
                    continue
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                refuse_undecodable_name(full)
                found[rel] = {"size": os.path.getsize(full), "path": full, "tag": None}
        return found
    info = U.with_retry(f"listing {uri}", lambda: fs.find(path, detail=True, withdirs=False))
    if not info and U.with_retry(f"checking {uri}", lambda: fs.isfile(path)):
        info = {path: U.with_retry(f"checking {uri}", lambda: fs.info(path))}
    base = path.rstrip("/") + "/"
    found = {}
    for p, i in info.items():
        if skip and (p + "/").startswith(skip):
            continue
        rel = p[len(base):] if p.startswith(base) else os.path.basename(p)
        tag = next((str(i[k]) for k in _TAG_KEYS if i.get(k)), None)
        found[rel] = {"size": int(i.get("size") or 0), "path": p, "tag": tag}
    return found


def refuse_undecodable_name(path: str) -> None:
    """`BadInput` for a name that is not UTF-8 (Python carries its bytes as lone surrogates, which no
    manifest, JSON or database can hold)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise BadInput(f"{shown}: a file or folder name that is not UTF-8; rename it (e.g. convmv -f latin1 -t "
                       f"utf8)") from None


def _top_manifests(names: list[str]) -> list[str]:
    """Folders (relative, "" for the top) holding a manifest with no manifest above them."""
    folders = sorted((n[: -len(MANIFEST)].rstrip("/") for n in names if n == MANIFEST or n.endswith("/" + MANIFEST)),
                     key=lambda f: (f.count("/"), f))
    top: list[str] = []
    for f in folders:
        if not any(f == t or f.startswith(t + "/") or t == "" for t in top):
            top.append(f)
    return top


def input_digest(uri: str, *, exclude: str | None = None) -> str | None:
    """The content digest of what is stored at `uri` (see the module docstring); `exclude` (the reading stage's own
    output, when it lies below `uri`) is left out. None when nothing is stored there."""
    uri = str(uri).rstrip("/")
    manifest = read_manifest(uri)
    if manifest is not None:
        return manifest_digest(manifest)
    files = _listing(uri, exclude)
    if not files:
        return None
    outputs = _top_manifests(list(files))
    if outputs:
        digests = {f: manifest_digest(read_manifest(U.join(uri, f)) or {}) for f in outputs}
        return _digest_lines(f"{f}\t{d}" for f, d in sorted(digests.items()))
    if U.is_local(uri):
        hashes = local_hashes({rel: e["path"] for rel, e in files.items()})
        return _digest_lines(f"{rel}\t{files[rel]['size']}\t{hashes[rel]}" for rel in sorted(files))
    fs, _ = U.split(uri)
    return _digest_lines(f"{rel}\t{e['size']}\t{e['tag'] or _remote_sha256(fs, e['path'])}"
                         for rel, e in sorted(files.items()))


def _remote_sha256(fs, path: str) -> str:
    """A store that gives no content tag: read the object (rare; object stores give ETags)."""
    data = U.with_retry(f"reading {path}", lambda: fs.cat_file(path))
    return hashlib.sha256(data).hexdigest()


def local_hashes(paths: dict[str, str]) -> dict[str, str]:
    """sha256 of local files, each read only when it is new or changed since it was last hashed. One process at a
    time hashes (the ranks of a fine-tuning run all check the same base model: one reads it, the others find it
    cached)."""
    db_path = os.path.join(cache.cache_dir(), "file-hashes.sqlite")
    out: dict[str, str] = {}
    with open(db_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            db = sqlite3.connect(db_path, timeout=60)
            db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT, sha256 TEXT)")
        except sqlite3.Error as e:  # a broken cache costs time, never correctness
            log.warning("file hash cache %s unusable (%s); hashing without it", db_path, e)
            db = None
        fresh = []
        for rel, path in paths.items():
            real = os.path.realpath(path)
            st = os.stat(real)
            stamp = json.dumps([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
            row = db.execute("SELECT stat, sha256 FROM files WHERE path = ?", (real,)).fetchone() if db else None
            if row and row[0] == stamp:
                out[rel] = row[1]
                continue
            out[rel] = cache.sha256_file(real)
            fresh.append((real, stamp, out[rel]))
        if db is not None:
            with db:
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", fresh)
            db.close()
        if fresh:
            log.info("hashed %d file(s) (%.1f MB) for the input digest; cached for later runs", len(fresh),
                     sum(os.path.getsize(p) for p, _, _ in fresh) / 1e6)
    return out


def input_digests(cfg, *, exclude: str | None = None) -> dict:
    """{field: digest} for the config fields declared as inputs (`opt(..., input=True)`); list fields give a list."""

    digests: dict = {}
    for name, value in input_fields(cfg).items():
        for v in value if isinstance(value, list) else [value] if value else []:
            U.check_uri(v)
        if isinstance(value, list):
            digests[name] = [input_digest(v, exclude=exclude) for v in value]
        elif value:
            digests[name] = input_digest(value, exclude=exclude)
    return digests


def changed_input(recorded: dict, current: dict) -> str | None:
    """The first input field whose content differs from what was recorded (an input now gone never counts)."""
    for name, now in current.items():
        before = recorded.get(name)
        pairs = zip(before, now) if isinstance(now, list) and isinstance(before, list) and len(before) == len(now) \
            else [(before, now)]
        if any(b != n and n is not None for b, n in pairs):
            return name
    return None
