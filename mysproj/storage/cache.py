"""Local staging of remote inputs: each object is downloaded once, verified, and kept by content hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from mysproj.errors import IncompleteOutput
from mysproj.storage import s3_transfer
from mysproj.storage import uri as U


def cache_dir() -> str:
    d = os.environ.get("MYSPROJ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mysproj")
    os.makedirs(d, exist_ok=True)
    return d


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(uri: str, sha256: str | None = None, *, parts: dict | None = None, size: int | None = None) -> str:
    """A local path holding `uri`'s bytes. Local files are used in place (verified when a hash is given);
    remote ones are downloaded once into the cache, keyed by content hash when known (s3: concurrent ranged
    GETs, verified per part where `parts` gives the part digests, see `mysproj.storage.s3_transfer`)."""
    if U.is_local(uri):
        path = U.local_path(uri)
        missing = (f"{uri}: file is missing (deleted or moved after its manifest was written); restore it, or "
                   f"re-run the stage that writes it")
        if not os.path.exists(path):
            raise IncompleteOutput(missing)
        try:
            digest = sha256_file(path) if sha256 else None
        except FileNotFoundError:  # gone between the check and the read
            raise IncompleteOutput(missing) from None
        if sha256 and digest != sha256:
            raise IncompleteOutput(f"{uri}: sha256 does not match its manifest; the file is corrupt or was "
                                   f"changed after the stage finished; re-run the stage")
        return path
    key = sha256 or hashlib.sha256(uri.encode()).hexdigest()
    target = os.path.join(cache_dir(), "blobs", key[:2], key)
    if os.path.exists(target):
        return target
    if s3_transfer.is_s3(uri):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        s3_transfer.download(uri, target, sha256=sha256, parts=parts, size=size)
        return target
    tmp = target + ".part"
    U.get_file(uri, tmp)
    if sha256 and sha256_file(tmp) != sha256:
        os.remove(tmp)
        raise IncompleteOutput(f"{uri}: sha256 does not match its manifest; the object is corrupt or was "
                               f"changed after the stage finished; re-run the stage")
    os.replace(tmp, target)
    return target


def assemble(local_files: dict[str, str]) -> str:
    """One local folder holding `{relative name: cached local file}` (hard links, copies across file systems).
    Keyed by its sources, built under a temporary name and renamed into place, so a concurrent reader never
    sees half a folder."""
    key = hashlib.sha256(json.dumps(sorted(local_files.items())).encode()).hexdigest()[:32]
    target = os.path.join(cache_dir(), "dirs", key)
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    tmp = tempfile.mkdtemp(dir=cache_dir())
    for rel, src in local_files.items():
        dest = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    open(os.path.join(tmp, ".complete"), "w").close()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_folder(uri: str) -> str | None:
    """A local folder with every object under a remote folder `uri` (None when nothing is stored there)."""
    files = U.list_files(uri)
    if not files:
        return None
    return assemble({rel: fetch(U.join(uri, rel)) for rel in files})
