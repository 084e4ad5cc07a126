"""One writer per stage output: an exclusive lease, `_LEASE.json` beside where the manifest goes, taken before a
stage writes anything and given back when it ends.

- Local folders: the lease is an `flock` on `_LEASE.json`. The kernel holds it while the writing process lives and
  drops it the moment that process dies (`kill -9` included), so a killed writer's lease is taken over at once and
  a live one never expires. The file names the holder (host, pid, stage) for the waiting writer's message.
- S3: `_LEASE.json` is created with `If-None-Match: *` (only one PutObject of a missing key succeeds), renewed every
  `ttl / 4` with `If-Match: <its ETag>` (each renewal writes new content, so a new ETag), and deleted with
  `If-Match` when the stage ends. A lease whose ETag has not changed for `ttl` seconds of the waiting writer's own
  clock (no clock skew between hosts counts) belongs to a dead writer and is taken over with `If-Match: <that
  ETag>`: of several writers taking over at once, one wins. A writer whose renewal finds another ETag has lost its
  lease and does not commit.
- Other schemes have no atomic create here: no lease (one debug line).

A second writer waits while the lease is held (one log line naming the holder), then finds the output complete
and skips it. `MYSPROJ_LEASE_WAIT_SECONDS` bounds that wait (0: refuse at once); past it, one `BadInput` line names
the holder. `MYSPROJ_LEASE_SECONDS` is the S3 lease's time to live (default 30).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from mysproj.errors import BadInput, StorageError
from mysproj.storage import uri as U

log = logging.getLogger(__name__)
LEASE = "_LEASE.json"
TTL_ENV, WAIT_ENV = "MYSPROJ_LEASE_SECONDS", "MYSPROJ_LEASE_WAIT_SECONDS"
_POLL_S = 0.5


class LeaseHeld(BadInput):
    """Another writer holds the output's lease and the wait allowed for it is over."""


class LeaseLost(StorageError):
    """This writer's lease was taken over (it stalled past the lease's time to live): its output is not committed."""


def _seconds(name: str, default: float | None, minimum: float) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value) or value < minimum:
        raise BadInput(f"{name}={raw!r}: expected a number of seconds >= {minimum:g}")
    return value


def ttl_seconds() -> float:
    return _seconds(TTL_ENV, 30.0, 1.0)


def wait_seconds() -> float | None:
    """None: wait as long as the holder keeps its lease."""
    value = _seconds(WAIT_ENV, None, 0.0)
    return None if value is None or math.isinf(value) else value


def _holder(stage: str) -> dict:
    return {"holder": f"{stage} on {socket.gethostname()} pid {os.getpid()}", "token": uuid.uuid4().hex,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe(raw: bytes | None) -> str:
    try:
        info = json.loads(raw or b"{}")
        return f"{info['holder']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "another writer"


class _Waiting:
    """The wait for a held lease: one log line, then a `LeaseHeld` line once the allowed wait is over."""

    def __init__(self, uri: str):
        self.uri, self.limit = uri, wait_seconds()
        self.t0, self.logged = time.monotonic(), False

    def another_round(self, holder: str) -> None:
        waited = time.monotonic() - self.t0
        if self.limit is not None and waited >= self.limit:
            raise LeaseHeld(f"{self.uri} is being written by {holder} (its lease {U.join(self.uri, LEASE)}); "
                            f"wait for it to finish, stop it, or raise {WAIT_ENV}")
        if not self.logged:
            self.logged = True
            log.info("%s is being written by %s; waiting for it", self.uri, holder)
        time.sleep(_POLL_S if self.limit is None else min(_POLL_S, max(0.01, self.limit - waited)))


class LocalLease:
    def __init__(self, uri: str, stage: str):
        self.uri, self.path, self.stage = uri, U.local_path(U.join(uri, LEASE)), stage
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        waiting = _Waiting(self.uri)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                waiting.another_round(_describe(_read(self.path)))
                continue
            try:  # the previous holder removes the file as it lets go: a lock on a removed file counts for nothing
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder(self.stage)).encode(), 0)
            self.fd = fd
            return

    def check(self) -> None:
        """An flock cannot be lost while its process lives."""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # still locked: no one can take the file between this and the close
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return None


def _condition_failed(e: BaseException) -> bool:
    """A 412 (If-None-Match / If-Match not met), as s3fs translates it."""
    return isinstance(e, FileExistsError) or (isinstance(e, OSError) and e.errno == errno.EINVAL
                                              and ("condition" in str(e).lower() or "412" in str(e)))


def _conditional(fs, method: str, **kwargs) -> dict | None:
    """One S3 call with a condition; None where the condition failed (not retried: it is an answer)."""
    try:
        return fs.call_s3(method, **kwargs)
    except OSError as e:
        if _condition_failed(e):
            return None
        raise


class S3Lease:
    def __init__(self, uri: str, stage: str):
        self.uri, self.stage, self.ttl = uri, stage, ttl_seconds()
        self.target = U.join(uri, LEASE)
        self.fs, path = U.split(self.target)
        self.bucket, self.key = self.fs.split_path(path)[:2]
        self.info = _holder(stage)
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewals = 0

    def _put(self, **condition) -> str | None:
        """PutObject of this holder's record under `condition`; its new ETag, or None where the condition failed."""
        self._renewals += 1
        body = json.dumps({**self.info, "renewal": self._renewals}).encode()
        r = U.with_retry(f"writing {self.target}", lambda: _conditional(
            self.fs, "put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition), budget=self.ttl / 2)
        return r["ETag"] if r else None

    def _current(self) -> tuple[str, bytes | None] | None:
        """(ETag, content) of the lease there now, or None when there is none."""
        try:
            head = U.with_retry(f"checking {self.target}", lambda: self.fs.call_s3(
                "head_object", Bucket=self.bucket, Key=self.key))
        except FileNotFoundError:
            return None
        try:
            raw = U.with_retry(f"reading {self.target}", lambda: self.fs.cat_file(f"{self.bucket}/{self.key}"))
        except FileNotFoundError:
            raw = None
        return head["ETag"], raw

    def acquire(self) -> None:
        waiting = _Waiting(self.uri)
        seen: tuple[str, float] | None = None  # (ETag, when this writer first saw it)
        while True:
            self.etag = self._put(IfNoneMatch="*")
            if self.etag:
                break
            now = self._current()
            if now is None:
                continue  # let go of just now
            etag, raw = now
            if seen is None or seen[0] != etag:
                seen = (etag, time.monotonic())
            elif time.monotonic() - seen[1] > self.ttl:
                self.etag = self._put(IfMatch=etag)
                if self.etag:
                    log.warning("%s: took over the lease of %s (not renewed for %.0f s: its writer stopped)",
                                self.uri, _describe(raw), self.ttl)
                    break
                seen = None
                continue
            waiting.another_round(_describe(raw))
        self._thread = threading.Thread(target=self._renew, name="mysproj-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 - try again next round; the lease lasts `ttl`
                log.warning("%s: could not renew the lease (%s); trying again", self.uri, e)
                continue
            if etag is None:
                self.lost = (f"{self.uri}: another writer took over this stage's lease (this one stalled past "
                             f"{self.ttl:.0f} s, {TTL_ENV}); its output is left to that writer")
                log.error("%s", self.lost)
                return
            self.etag = etag

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag and not self.lost:
            etag = self.etag
            try:
                U.with_retry(f"removing {self.target}", lambda: _conditional(
                    self.fs, "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag), budget=self.ttl / 2)
            except Exception as e:  # noqa: BLE001 - a lease left behind expires after `ttl`
                log.warning("%s: could not remove the lease (%s); it expires in %.0f s", self.uri, e, self.ttl)
        self.etag = None


class _NoLease:
    waited = False

    def __init__(self, uri: str, stage: str):
        log.debug("%s: no atomic create on this storage; writing without a lease", uri)

    def acquire(self) -> None:
        pass

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


@contextmanager
def held(uri: str, stage: str) -> Iterator[LocalLease | S3Lease | _NoLease]:
    """The lease on output `uri` for the block's length (waiting while another writer holds it)."""
    protocol = str(uri).split("://", 1)[0] if "://" in str(uri) else "file"
    kind = LocalLease if U.is_local(uri) else S3Lease if protocol in ("s3", "s3a") else _NoLease
    lease = kind(uri, stage)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
