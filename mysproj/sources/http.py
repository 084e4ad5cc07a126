"""The download engine: one file over HTTP, fetched as fixed-size ranges over several connections when the
server honours `Range`, each range stored whole under a parts folder (a path or s3://) so that a killed process
resumes with only the missing ranges; then assembled while hashing and verified before it gets its final name.

Transient failures (5xx, 429, timeouts, resets, a body cut short) are retried with backoff while the same request
keeps failing for less than `retry_seconds`; refusals (401/403/404/410) and HTML pages are `BadInput` at once."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import httpx

from mysproj.errors import BadInput, redact
from mysproj.sources import verify as check
from mysproj.storage import uri as storage

log = logging.getLogger(__name__)

CHUNK_SIZE = 32 * 1024 * 1024
CONNECTIONS = 8
RETRY_SECONDS = float(os.environ.get("MYSPROJ_FETCH_RETRY_SECONDS", "300"))
_PROBE = 1024  # the first bytes, asked for with the size probe: enough to tell an HTML page
_REFUSED = {401: "not authorised", 403: "forbidden", 404: "not found", 410: "gone"}


class _Transient(Exception):
    """A failure worth retrying (a 5xx, 429, or a body shorter than announced)."""


def _show(url: str) -> str:
    """`url` for messages: no query string (signed URLs carry credentials there)."""
    parts = urllib.parse.urlsplit(str(url))
    return redact(urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


def filename_of(url: str) -> str:
    name = urllib.parse.unquote(os.path.basename(urllib.parse.urlsplit(url).path))
    return name if name not in ("", ".", "..") else "download"


def looks_html(content_type: str | None, head: bytes) -> bool:
    if content_type and content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    start = head[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html"))


class Engine:
    def __init__(self, url: str, headers: Mapping[str, str] | None = None, *, chunk_size: int = CHUNK_SIZE,
                 connections: int = CONNECTIONS, retry_seconds: float | None = None,
                 expect_binary: bool = True, what: str | None = None, log: logging.Logger = log):
        self.url, self.headers = url, dict(headers or {})
        self.chunk_size, self.connections = max(1, int(chunk_size)), max(1, int(connections))
        self.retry_seconds = RETRY_SECONDS if retry_seconds is None else retry_seconds
        self.expect_binary = expect_binary and not filename_of(url).lower().endswith((".html", ".htm"))
        self.what = what or _show(url)
        self.log = log
        self.fetched = 0
        self.total: int | None = None
        self.range_url = url  # where ranges are asked for: the URL after redirects
        self.etag: str | None = None
        self.stop = threading.Event()
        self._count = threading.Lock()
        self.client = httpx.Client(follow_redirects=True, trust_env=True,
                                   timeout=httpx.Timeout(30.0, read=60.0),
                                   limits=httpx.Limits(max_connections=self.connections + 1))

    # ------------------------------------------------------------------------------------------- requests

    def _check(self, resp: httpx.Response) -> None:
        code = resp.status_code
        if code in _REFUSED:
            hint = ("check the credentials (token / Secret) and that this account may read it" if code in (401, 403)
                    else "check the URL (a moved or deleted file?)")
            raise BadInput(f"{self.what}: the server answered {code} ({_REFUSED[code]}); {hint}")
        if code == 429 or code >= 500:
            raise _Transient(f"HTTP {code}")
        if code >= 400:
            raise BadInput(f"{self.what}: the server answered {code}; check the URL")

    def _retrying(self, what: str, fn):
        """`fn(progressed)` retried on transient failures; `progressed()` (called by fn when bytes arrive)
        restarts the budget, so only a request that keeps failing gives up."""
        delay, last_good = 0.5, [time.monotonic()]

        def progressed():
            last_good[0] = time.monotonic()

        while True:
            if self.stop.is_set():
                raise _Stopped()
            try:
                return fn(progressed)
            except (httpx.TransportError, _Transient) as e:
                if time.monotonic() - last_good[0] + delay > self.retry_seconds:
                    raise BadInput(f"{self.what}: {what} kept failing for {self.retry_seconds:.0f}s "
                                   f"({type(e).__name__}: {redact(str(e))}); the server or the network is down, "
                                   f"retry later") from None
                self.log.warning("%s: %s: %s: %s; retrying in %.1fs", self.what, what, type(e).__name__,
                                 redact(str(e)), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _count_bytes(self, n: int) -> None:
        with self._count:
            self.fetched += n

    def probe(self) -> tuple[httpx.Response | None, int | None, bytes, str]:
        """Ask for the first bytes. Returns (an open 200 response when ranges are not honoured, else None; the
        size; the first bytes; the URL to fetch ranges from, after redirects)."""

        def go(progressed):
            req = self.client.build_request("GET", self.url, headers={**self.headers, "Range": f"bytes=0-{_PROBE - 1}",
                                                                      "Accept-Encoding": "identity"})
            resp = self.client.send(req, stream=True)
            try:
                if resp.status_code == 416:  # an empty file has no byte 0
                    resp.close()
                    return None, 0, b"", str(resp.url)
                self._check(resp)
                self.etag = resp.headers.get("etag")
                if resp.status_code == 206:
                    total = resp.headers.get("content-range", "").rpartition("/")[2]
                    head = resp.read()
                    self._count_bytes(len(head))
                    self._sniff(resp, head)
                    resp.close()
                    if total.isdigit():
                        return None, int(total), head, str(resp.url)
                    raise BadInput(f"{self.what}: the server sent a range without the file's size")
                return resp, None, b"", str(resp.url)  # 200: the whole body follows
            except BaseException:
                resp.close()
                raise

        return self._retrying("asking for the size", go)

    def _sniff(self, resp: httpx.Response, head: bytes) -> None:
        if self.expect_binary and looks_html(resp.headers.get("content-type"), head):
            raise BadInput(f"{self.what}: the server sent an HTML page, not the file (a login or error page?); "
                           f"check the URL and whether the site needs you to sign in or accept terms")

    def _refresh(self, stale: str) -> None:
        """The redirect target (a signed URL) expired mid-download: ask the origin for a new one, once per
        expiry however many ranges noticed."""
        with self._count:
            if self.range_url != stale:
                return
        _, _, _, url = self.probe()
        with self._count:
            self.range_url = url

    def get_range(self, start: int, end: int, progress: check.Progress) -> bytes:
        """Bytes [start, end) of the file; a body cut short is asked for again from where it stopped."""
        buf = bytearray()

        def go(progressed):
            url = self.range_url
            headers = self.headers if _same_host(url, self.url) else {}
            want = f"bytes={start + len(buf)}-{end - 1}"
            with self.client.stream("GET", url, headers={**headers, "Range": want,
                                                          "Accept-Encoding": "identity"}) as resp:
                if resp.status_code in (401, 403) and url != self.url:
                    self._refresh(url)
                    raise _Transient(f"the signed URL answered {resp.status_code} (expired?); asked for a new one")
                self._check(resp)
                if resp.status_code != 206:
                    raise _Transient(f"asked for {want}, the server answered {resp.status_code}")
                for block in resp.iter_raw():
                    if self.stop.is_set():
                        raise _Stopped()
                    buf.extend(block[: end - start - len(buf)])
                    self._count_bytes(len(block))
                    progress.add(len(block))
                    progressed()
            if len(buf) < end - start:
                raise _Transient(f"the body stopped at {start + len(buf)} of {want}")
            return bytes(buf)

        return self._retrying(f"bytes {start}-{end - 1}", go)

    # ---------------------------------------------------------------------------------------------- files

    def fetch(self, dest_dir: str, filename: str, *, parts_uri: str | None = None, size: int | None = None,
              expect: Mapping[str, str] | None = None, keep_parts: bool = False) -> check.Fetched:
        """Fetch into `dest_dir/filename`, verified against `expect` ({"sha256"|"md5"|"git-sha1": hex}, md5 may
        be base64) and `size`. Nothing is at the final name unless it verified; a file already there that
        verifies is kept (nothing fetched). `keep_parts`: leave the verified parts for the caller to remove (a
        multi-file origin keeps them until every file verified, so a restart reassembles instead of fetching)."""
        expect = dict(expect or {})
        final = os.path.join(dest_dir, filename)
        temp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.incomplete")
        if expect and os.path.isfile(final):
            have = check.hash_file(final, check.hashers(os.path.getsize(final), expect))
            try:
                check.verify(self.what, have, size, expect, final)
                self.log.info("%s: already here and verified", self.what)
                self.client.close()
                return have
            except BadInput:
                pass
        own_parts = parts_uri is None
        if own_parts:
            parts_uri = tempfile.mkdtemp(prefix="mysproj-parts-")
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            stream, total, head, url = self.probe()
            self.total = total if total is not None else size
            if size is not None and total is not None and total != size:
                raise BadInput(f"{self.what}: the server has {total} bytes, {size} were expected")
            if stream is not None:
                out = self._single(stream, temp, size, expect)
            elif total == len(head):  # a small file came whole with the probe
                hashers = check.hashers(total, expect)
                with open(temp, "wb") as f:
                    f.write(head)
                for h in hashers.values():
                    h.update(head)
                out = check.fetched(hashers, total, self.fetched, None)
            else:
                out = self._ranged(url, total, head, temp, parts_uri, expect)
            self.total = out.size
            try:
                check.verify(self.what, out, size, expect, temp)
            except BadInput:
                storage.remove(parts_uri, recursive=True)  # wrong bytes: the next try fetches them anew
                raise
            os.replace(temp, final)
            if not own_parts and not keep_parts:
                storage.remove(parts_uri, recursive=True)
            return out
        except OSError as e:
            _remove(temp)
            if e.errno == errno.ENOSPC:
                need = self.total or size or 0
                raise BadInput(f"{os.path.dirname(final)}: disk full while writing {filename} "
                               f"({need / 1e9:.2f} GB needed); give the fetch a bigger volume") from None
            raise
        except BaseException:
            _remove(temp)
            raise
        finally:
            if own_parts:
                shutil.rmtree(parts_uri, ignore_errors=True)
            self.client.close()

    def _single(self, resp: httpx.Response, temp: str, size: int | None, expect: Mapping[str, str]) -> check.Fetched:
        """A server without ranges: one stream; a failure starts the file again (nothing to resume from)."""
        length = resp.headers.get("content-length")
        total = size if size is not None else (int(length) if length and length.isdigit() else None)
        progress = check.Progress(self.what, total, 0, self.log)
        first = [resp]

        def go(progressed):
            r = first.pop() if first else self.client.send(
                self.client.build_request("GET", self.url, headers={**self.headers, "Accept-Encoding": "identity"}),
                stream=True)
            try:
                self._check(r)
                hashers, n, sniffed = check.hashers(total, expect), 0, False
                with open(temp, "wb") as f:
                    for block in r.iter_raw():
                        if not sniffed:
                            self._sniff(r, block)
                            sniffed = True
                        f.write(block)
                        for h in hashers.values():
                            h.update(block)
                        n += len(block)
                        self._count_bytes(len(block))
                        progress.add(len(block))
                        progressed()
                if total is not None and n < total:
                    raise _Transient(f"the body stopped at {n} of {total} bytes")
                return check.fetched(hashers, n, self.fetched, r.headers.get("etag"))
            finally:
                r.close()

        return self._retrying("downloading", go)

    def _ranged(self, url: str, total: int, head: bytes, temp: str, parts_uri: str,
                expect: Mapping[str, str]) -> check.Fetched:
        n = -(-total // self.chunk_size)  # 0 for an empty file
        self.range_url = url
        meta = {"url": _show(self.url), "size": total, "chunk_size": self.chunk_size}
        meta_uri = storage.join(parts_uri, "parts.json")

        done_parts: set[int] = set()
        if storage.exists(meta_uri) and json.loads(storage.read_text(meta_uri)) == meta:
            done_parts = {int(p) for p in storage.list_files(parts_uri) if p.isdigit()}
        else:
            storage.remove(parts_uri, recursive=True)
            storage.write_text(meta_uri, json.dumps(meta))
        have = sum(min(self.chunk_size, total - i * self.chunk_size) for i in done_parts if i < n)
        if done_parts:
            self.log.info("%s: resuming, %d of %d parts (%.1f MB) already fetched", self.what,
                          len(done_parts & set(range(n))), n, have / 1e6)
        progress = check.Progress(self.what, total, have, self.log)

        def one(i: int) -> None:
            start, end = i * self.chunk_size, min(total, (i + 1) * self.chunk_size)
            data = self.get_range(start, end, progress)
            storage.write_bytes(storage.join(parts_uri, f"{i:06d}"), data)

        todo = [i for i in range(n) if i not in done_parts]
        if todo:
            with ThreadPoolExecutor(min(self.connections, len(todo)), thread_name_prefix="fetch") as pool:
                futures = [pool.submit(one, i) for i in todo]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    errors = [f.exception() for f in failed if not isinstance(f.exception(), _Stopped)]
                    raise errors[0] if errors else failed[0].exception()
        self.log.info("%s", progress.line())
        hashers = check.hashers(total, expect)
        written = 0
        with open(temp, "wb") as f:
            for i in range(n):
                data = storage.read_bytes(storage.join(parts_uri, f"{i:06d}"))
                f.write(data)
                for h in hashers.values():
                    h.update(data)
                written += len(data)
        return check.fetched(hashers, written, self.fetched, None)


class _Stopped(Exception):
    """Another range failed for good: this one stops too."""


def _same_host(a: str, b: str) -> bool:
    return urllib.parse.urlsplit(a).netloc == urllib.parse.urlsplit(b).netloc


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def download_origin(origin, dest: str, *, parts_uri: str | None, env: Mapping[str, str] = os.environ,
                    log: logging.Logger = log, **engine) -> dict:
    """An http(s) origin into `dest/<file name>`, verified against its sha256 pin when it has one."""
    t0 = time.monotonic()
    name = filename_of(origin.uri)
    eng = Engine(origin.uri, log=log, **engine)
    out = eng.fetch(dest, name, parts_uri=parts_uri, expect={"sha256": origin.sha256} if origin.sha256 else None)
    rec = check.record(origin, None, {name: out}, time.monotonic() - t0,
                       "sha256 pin" if origin.sha256 else "none (unpinned; sha256 recorded)")
    if eng.etag:  # lets a later run tell whether an unpinned URL still serves the same bytes
        rec["etag"] = eng.etag
    return rec
