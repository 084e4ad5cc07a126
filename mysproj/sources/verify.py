"""What a fetch checks and records: the digests asked for while the bytes are written, the comparison with the
origin's (a pin, the hub's listing, Kaggle's md5), and the manifest record of a download."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from mysproj.errors import BadInput

PROGRESS_SECONDS = 5.0


@dataclass
class Fetched:
    size: int
    sha256: str
    bytes_fetched: int
    digests: dict[str, str] = field(default_factory=dict)  # the other digests asked for (md5, git-sha1)
    etag: str | None = None


class Progress:
    """`what: 12.6/625.2 MB (48.1 MB/s, ETA 13s)` at most every PROGRESS_SECONDS."""

    def __init__(self, what: str, total: int | None, done: int, log: logging.Logger):
        self.what, self.total, self.done, self.log = what, total, done, log
        self.start_done = done
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= PROGRESS_SECONDS:
                self.last = now
                self.log.info("%s", self.line())

    def line(self) -> str:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        total = f"{self.total / 1e6:.1f}" if self.total is not None else "?"
        eta = f"{(self.total - self.done) / rate:.0f}s" if self.total is not None and rate > 0 else "?"
        return f"{self.what}: {self.done / 1e6:.1f}/{total} MB ({rate / 1e6:.1f} MB/s, ETA {eta})"


def hashers(size: int | None, expect: Mapping[str, str]) -> dict:
    hashers = {"sha256": hashlib.sha256()}
    if "md5" in expect:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    if "git-sha1" in expect and size is not None:
        hashers["git-sha1"] = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    return hashers


def hash_file(path: str, hashers: dict) -> Fetched:
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            size += len(block)
            for h in hashers.values():
                h.update(block)
    return fetched(hashers, size, 0, None)


def fetched(hashers: dict, size: int, fetched: int, etag: str | None) -> Fetched:
    digests = {k: h.hexdigest() for k, h in hashers.items() if k != "sha256"}
    return Fetched(size, hashers["sha256"].hexdigest(), fetched, digests, etag)


def verify(what: str, out: Fetched, size: int | None, expect: Mapping[str, str], temp: str) -> None:
    if size is not None and out.size != size:
        raise BadInput(f"{what}: got {out.size} bytes, expected {size}; the file changed at its origin or the "
                       f"transfer was cut; fetch it again")
    for algo, want in expect.items():
        got = out.sha256 if algo == "sha256" else out.digests.get(algo)
        if got is None:
            continue
        if algo == "md5" and len(want) != 32:  # x-goog-hash gives md5 in base64
            want = base64.b64decode(want).hex()
        if got.lower() != want.lower():
            raise BadInput(f"{what}: {algo} mismatch: expected {want.lower()}, got {got}; the file at the origin "
                           f"is not the one pinned (fix the pin if the origin changed on purpose)")


def record(origin, revision: str | None, files: Mapping[str, Fetched], seconds: float, verified: str) -> dict:
    fetched = sum(f.bytes_fetched for f in files.values())
    return {"origin": origin.uri, "revision": revision,
            "files": {k: {"size": f.size, "sha256": f.sha256} for k, f in sorted(files.items())},
            "bytes_fetched": fetched, "bytes_total": sum(f.size for f in files.values()),
            "seconds": round(seconds, 3), "mb_per_s": round(fetched / 1e6 / max(seconds, 1e-9), 2),
            "verified": verified}
