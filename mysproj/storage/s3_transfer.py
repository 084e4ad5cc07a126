"""Objects in S3 moved at line rate: one object read as concurrent ranged GETs straight into a caller's buffer
(memory, pinned memory or a mapped file), every part verified as it lands; and written as concurrent multipart
uploads (`mysproj.storage.s3_upload`).

A stage output's manifest records, for files larger than one part, the sha256 of each part (`parts`: part size and
digests) beside the file's own sha256, so that parts can be checked in parallel and a bad one named and fetched
again; a file without part digests is checked whole once every part is in. A part whose bytes still do not match
after a second fetch is refused with one line naming the object and the byte range. A connection that drops
mid-part is resumed from the last byte received (the storage retry budget, `MYSPROJ_STORAGE_RETRY_SECONDS`), and
every GET names the object's ETag, so an object replaced meanwhile is never mixed with the old one.

Settings (one storage config, read from the environment where a transfer starts):
`MYSPROJ_S3_CONNECTIONS` (default 16) concurrent connections per transfer, `MYSPROJ_S3_PART_MIB` (default 64) the
part size of ranged reads, multipart uploads and recorded part digests (AWS S3 refuses multipart parts under 5 MiB
but the last; fractions are for tests against servers that take smaller ones). botocore (s3fs's own S3 client) is used
directly: its synchronous client releases the GIL while it reads a socket, so threads reach line rate.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.session
from botocore.config import Config

from mysproj.errors import BadInput, IncompleteOutput
from mysproj.storage import uri as U
from mysproj.storage.stage_time import transfer

CONNECTIONS_ENV, PART_MIB_ENV = "MYSPROJ_S3_CONNECTIONS", "MYSPROJ_S3_PART_MIB"


@dataclass(frozen=True)
class TransferSettings:
    connections: int = 16
    part_bytes: int = 64 * 1024**2

    @classmethod
    def from_env(cls) -> TransferSettings:
        raw_c, raw_p = (os.environ.get(n, "").strip() for n in (CONNECTIONS_ENV, PART_MIB_ENV))
        if raw_c and not (raw_c.isdigit() and int(raw_c) >= 1):
            raise BadInput(f"{CONNECTIONS_ENV}={raw_c!r}: expected a whole number >= 1")
        try:
            part_mib = float(raw_p) if raw_p else cls.part_bytes / 1024**2
        except ValueError:
            part_mib = -1.0
        if not 1 / 1024 <= part_mib <= 5 * 1024:
            raise BadInput(f"{PART_MIB_ENV}={raw_p!r}: expected a number of MiB between 1/1024 and 5120 (AWS S3 "
                           f"takes parts of 5 MiB or more)")
        return cls(connections=int(raw_c) if raw_c else cls.connections, part_bytes=int(part_mib * 1024**2))


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def bucket_key(uri: str) -> tuple[str, str]:
    path = str(uri).split("://", 1)[1]
    bucket, _, key = path.partition("/")
    return bucket, key


_CLIENTS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def client(connections: int):
    """A botocore S3 client, one per process, credential set and transfer width; its pool holds the connections of
    a few transfers at once (a stage uploads one file while it hashes and sends the next)."""

    key = (os.getpid(), connections, tuple(os.environ.get(k) for k in U._CLIENT_ENV))
    with _LOCK:
        found = _CLIENTS.get(key)
        if found is None:
            session = botocore.session.get_session()
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            found = _CLIENTS[key] = session.create_client(
                "s3", endpoint_url=U.s3_endpoint() or None, region_name=region,
                config=Config(max_pool_connections=4 * connections, connect_timeout=5, read_timeout=60,
                              retries={"max_attempts": 3, "mode": "standard"}))
        return found


def part_ranges(size: int, part_bytes: int) -> list[tuple[int, int]]:
    """[(start, end)) of consecutive parts covering `size` bytes (one empty part for an empty object)."""
    return [(a, min(a + part_bytes, size)) for a in range(0, size, part_bytes)] or [(0, 0)]


def part_digests(data, part_bytes: int) -> list[str]:
    view = memoryview(data)
    return [hashlib.sha256(view[a:b]).hexdigest() for a, b in part_ranges(len(view), part_bytes)]


class _Dropped(ConnectionError):
    """A body that ended before its range did (a connection cut mid-part): transient, resumed."""


def _transient(e: Exception) -> Exception:
    """Errors of a body being read, as the storage layer's retry understands them (ConnectionError: transient)."""
    name = type(e).__name__
    if isinstance(e, (ConnectionError, TimeoutError)) or any(
            k in name for k in ("Streaming", "Protocol", "IncompleteRead", "ReadTimeout", "Connect", "Endpoint")):
        return _Dropped(f"{name}: {U._first_line(e)}")
    return e


def _read_range(s3, bucket: str, key: str, etag: str, view: memoryview, start: int, what: str) -> None:
    """Fill `view` with the object's bytes from `start`, resuming after a dropped connection where it stopped."""
    done = 0

    def attempt() -> None:
        nonlocal done
        if done == len(view):
            return
        end = start + len(view) - 1
        try:
            resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start + done}-{end}", IfMatch=etag)
            body = resp["Body"]
            raw = getattr(body, "_raw_stream", None)
            while done < len(view):
                if raw is not None and hasattr(raw, "readinto"):
                    n = raw.readinto(view[done:])
                else:
                    chunk = body.read(min(len(view) - done, 1 << 20))
                    n = len(chunk)
                    view[done:done + n] = chunk
                if not n:
                    raise _Dropped(f"the body ended {len(view) - done} bytes early")
                done += n
            body.close()
        except Exception as e:  # noqa: BLE001 - classified for the retry below
            if type(e).__name__ == "ClientError" and "PreconditionFailed" in str(e):
                raise IncompleteOutput(f"{what}: the object was replaced while it was read; re-run") from None
            if type(e).__name__ == "ClientError" and ("NoSuchKey" in str(e) or "404" in str(e)):
                raise IncompleteOutput(f"{what}: the object is missing; re-run the stage that writes it") from None
            raise _transient(e) from None

    U.with_retry(f"reading {what} bytes {start}-{start + len(view)}", attempt)


def read_into(uri: str, buffer, *, sha256: str | None = None, parts: dict | None = None,
              settings: TransferSettings | None = None,
              on_part: Callable[[int, int], None] | None = None) -> int:
    """Read object `uri` into `buffer` (a writable buffer exactly its size) as concurrent ranged GETs, verified:
    each part against `parts` (`{"bytes": part size, "sha256": [...]}`, as a manifest records them), else the whole
    against `sha256`. `on_part(start, end)` is called (from a worker thread) once a part's bytes are in and verified.
    Returns the bytes read."""

    settings = settings or TransferSettings.from_env()
    view = memoryview(buffer).cast("B")
    bucket, key = bucket_key(uri)
    s3 = client(settings.connections)
    with transfer("in"):
        head = U.with_retry(f"stat {uri}", lambda: _head(s3, bucket, key, uri))
        size, etag = int(head["ContentLength"]), head["ETag"]
        if size != len(view):
            raise IncompleteOutput(f"{uri}: {size} bytes stored, {len(view)} expected (its manifest's size); the "
                                   f"object was changed after the stage finished; re-run the stage")
        part_bytes = int(parts["bytes"]) if parts else settings.part_bytes
        ranges = part_ranges(size, part_bytes)
        digests = list(parts["sha256"]) if parts else None
        if digests is not None and len(digests) != len(ranges):
            raise IncompleteOutput(f"{uri}: its manifest records {len(digests)} part digests for {len(ranges)} "
                                   f"parts; re-run the stage that wrote it")

        def one(i: int) -> None:
            a, b = ranges[i]
            if b > a:
                for tries in (1, 2):
                    _read_range(s3, bucket, key, etag, view[a:b], a, uri)
                    if digests is None or hashlib.sha256(view[a:b]).hexdigest() == digests[i]:
                        break
                    if tries == 2:
                        raise IncompleteOutput(
                            f"{uri}: part {i + 1} of {len(ranges)} (bytes {a}-{b}) does not match the sha256 its "
                            f"manifest records, fetched twice; the object is corrupt or was changed after the stage "
                            f"finished; re-run the stage that wrote it")
            if on_part is not None:
                on_part(a, b)

        with ThreadPoolExecutor(max_workers=max(1, min(settings.connections, len(ranges))),
                                thread_name_prefix="s3-get") as pool:
            for f in [pool.submit(one, i) for i in range(len(ranges))]:
                f.result()
        if digests is None and sha256 and hashlib.sha256(view).hexdigest() != sha256:
            raise IncompleteOutput(f"{uri}: sha256 does not match its manifest; the object is corrupt or was "
                                   f"changed after the stage finished; re-run the stage")
    return size


def _head(s3, bucket: str, key: str, uri: str) -> dict:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "ClientError" and ("404" in str(e) or "NoSuchKey" in str(e) or "Not Found" in str(e)):
            raise IncompleteOutput(f"{uri}: the object is missing; re-run the stage that writes it") from None
        if type(e).__name__ == "ClientError" and "403" in str(e):
            raise PermissionError(str(e)) from None
        raise _transient(e) from None


def download(uri: str, local: str, *, sha256: str | None = None, parts: dict | None = None,
             size: int | None = None, settings: TransferSettings | None = None) -> None:
    """`uri` into local file `local` (complete or absent): ranged GETs written straight into the mapped file."""
    if size is None:
        settings = settings or TransferSettings.from_env()
        bucket, key = bucket_key(uri)
        size = int(U.with_retry(f"stat {uri}", lambda: _head(client(settings.connections), bucket, key, uri))
                   ["ContentLength"])
    tmp = f"{local}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb+") as f:
            f.truncate(size)
            if size:
                # not closed here: a retried part's traceback may still hold a view of it; the mapping goes
                # with its last reference (the bytes are in the file once flushed)
                mapped = mmap.mmap(f.fileno(), size)
                read_into(uri, mapped, sha256=sha256, parts=parts, settings=settings)
                mapped.flush()
                del mapped
            else:
                read_into(uri, bytearray(), sha256=sha256, parts=parts, settings=settings)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
