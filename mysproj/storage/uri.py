"""Every input and output is a URI: a plain path or file:// (the embedded default), s3:// through s3fs, or any
other fsspec scheme installed. URI schemes are handled here and nowhere else.

Transient failures (an object store restarting, a dropped connection) are retried with exponential backoff for
`MYSPROJ_STORAGE_RETRY_SECONDS` (default 120), then surface as one `StorageError` line stating that budget; missing
or wrong credentials and missing objects are not transient and surface as one clear `BadInput` line. A local write
that fails (a full disk or quota included) removes its temporary file.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TypeVar

import fsspec

from mysproj.errors import BadInput, StorageError, has_uri_credentials, redact
from mysproj.storage.stage_time import transfer

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "MYSPROJ_STORAGE_RETRY_SECONDS"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def retry_seconds() -> float:
    """The retry budget of storage calls; read when a call needs it, so a bad value never breaks `--help`."""
    raw = os.environ.get(RETRY_ENV, "120")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"{RETRY_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def s3_endpoint(env: Mapping[str, str] | None = None) -> str:
    """The S3 endpoint URL `env` (default: this process's environment) sets; '' for AWS S3 itself."""
    env = os.environ if env is None else env
    return env.get("MYSPROJ_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""


def _storage_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        endpoint = s3_endpoint()
        # Listings are cached per filesystem instance; other processes (the next stage, the controller)
        # write here too, so a stale listing would hide their manifests.
        opts: dict = {"use_listings_cache": False, "skip_instance_cache": True,
                      "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"},
                                        "connect_timeout": 5, "read_timeout": 60}}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


# Environment that decides which endpoint/credentials a client uses; a change gives a new client.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "MYSPROJ_S3_ENDPOINT",
               "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CLIENTS: dict[tuple, fsspec.AbstractFileSystem] = {}


def check_uri(uri: str) -> None:
    """`BadInput` for a URI no storage call should get: credentials written into it (they would end up in logs,
    manifests and Job specs), or a scheme no installed fsspec implementation serves."""
    uri = str(uri)
    if has_uri_credentials(uri):
        raise BadInput(f"{redact(uri)}: credentials inside a URI are refused; give them as AWS_ACCESS_KEY_ID / "
                       f"AWS_SECRET_ACCESS_KEY (or the chart's credentials Secret) and use the URI without them")
    if "://" not in uri:
        return
    protocol = uri.split("::")[-1].split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise BadInput(f"{uri}: unknown URI scheme '{protocol}://'; use a path, file://, s3:// or another "
                       f"installed fsspec scheme") from None
    except ImportError as e:
        raise BadInput(f"{uri}: the '{protocol}://' scheme needs a package that is not installed "
                       f"({str(e).splitlines()[0]})") from None


def _not_empty(uri: str) -> str:
    uri = str(uri)
    if not uri.strip():
        # os.path.join("", x) and "" + "/" + x both name a path at the root of the file system
        raise BadInput("an empty path or URI was given (an unset shell variable?); pass a folder or URI")
    return uri


def split(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it). Plain paths become absolute local paths (`~` expanded)."""
    uri = _not_empty(uri)
    if "://" not in uri:
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))
    check_uri(uri)
    protocol = uri.split("://", 1)[0]
    if "::" in uri:  # chained URLs (simplecache::s3://...) are rare: build them each time
        return fsspec.core.url_to_fs(uri, **_storage_options(protocol))
    # One client per process and credential set: creating an S3 client is slow enough to dominate per-object
    # reads (images). Listings are never cached (see _storage_options), so sharing it is safe.
    key = (os.getpid(), protocol, tuple(os.environ.get(k) for k in _CLIENT_ENV))
    fs = _CLIENTS.get(key)
    if fs is None:
        fs = _CLIENTS[key] = fsspec.filesystem(protocol, **_storage_options(protocol))
    return fs, fs._strip_protocol(uri)


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str) -> str:
    return split(uri)[1]


def canonical(uri: str) -> str:
    """One spelling per location, to compare two URIs: local paths absolute with links resolved and `file://`
    dropped; other schemes as `scheme://path` without a trailing `/`."""
    fs, path = split(uri)
    if is_local(uri):
        return os.path.realpath(path)
    protocol = str(uri).split("::")[-1].split("://", 1)[0]
    return f"{protocol}://{path.rstrip('/')}"


def contains(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or lies below it (both canonical)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, BadInput)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    name = type(e).__name__
    return any(k in name for k in ("Endpoint", "Connect", "Timeout", "ServerDisconnected", "ClientOSError"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def with_retry(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """Run `fn`, retrying transient storage errors with backoff for up to `budget` seconds (default: the
    `MYSPROJ_STORAGE_RETRY_SECONDS` budget); past it, one `StorageError` line that states the budget."""
    budget = retry_seconds() if budget is None else budget
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn()
        except PermissionError as e:
            raise BadInput(f"{what}: access denied ({e}); check the storage credentials "
                           f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the credentials Secret)") from None
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise BadInput(f"{what}: no storage credentials found; set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (or the chart's credentials Secret)") from None
            if isinstance(e, OSError) and e.errno in _NO_SPACE:
                raise StorageError(f"{what}: no space left ({_first_line(e)}); free space or raise the quota, "
                                   f"then re-run") from None
            if not _is_transient(e):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageError(f"{what}: {type(e).__name__}: {_first_line(e)} (still failing after "
                                   f"{budget:.0f} s of retries, the {RETRY_ENV} budget); check the endpoint "
                                   f"and the network, then re-run") from None
            log.warning("%s: %s: %s; retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def exists(uri: str) -> bool:
    fs, path = split(uri)
    return with_retry(f"checking {uri}", lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = split(uri)
    try:
        if is_local(uri):
            return with_retry(f"reading {uri}", lambda: fs.cat_file(path))
        with transfer("in"):
            return with_retry(f"reading {uri}", lambda: fs.cat_file(path))
    except FileNotFoundError:
        raise BadInput(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{uri}: is a folder, not a file") from None


def make_dirs(uri: str) -> None:
    """Create a local output folder now, so that an unwritable `--out` fails before any work is done (object
    stores have no folders to create)."""
    if not is_local(uri):
        return
    path = local_path(uri)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise BadInput(f"{uri}: cannot write here ({e.strerror or type(e).__name__}); pass a writable --out") \
            from None


def read_text(uri: str) -> str:
    return decode_text(read_bytes(uri), uri)


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text (a leading byte order mark dropped); other encodings are one `BadInput` line naming `name`."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        boms = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
                b"\xfe\xff": "UTF-16"}
        found = next((f"{enc} (it starts with that byte order mark)" for bom, enc in boms.items()
                      if data.startswith(bom)), f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}, "
                                                f"e.g. Latin-1 or Windows-1252")
        raise BadInput(f"{name}: the text is {found}; save it as UTF-8") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object whole. Local files go through a temporary name and an atomic rename, so a reader
    never sees half a file; object stores give that per object already."""
    fs, path = split(uri)
    if is_local(uri):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        _local_write(uri, path, write)
        return
    with transfer("out"):
        with_retry(f"writing {uri}", lambda: fs.pipe_file(path, data))


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _local_write(uri: str, path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it into place. Whatever fails (a full disk, a
    quota, an interrupt) leaves no temporary file behind; no space is one `StorageError` line."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise StorageError(f"writing {uri}: no space left ({e.strerror or e}); free space or raise the "
                               f"quota, then re-run") from None
        raise
    finally:
        _discard(tmp)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def put_file(local: str, uri: str, move: bool = False) -> None:
    """Store local file `local` at `uri`. `move`: the local file may be taken (a rename where both are on one
    local file system, so nothing is copied)."""
    fs, path = split(uri)
    if is_local(uri):
        if move:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(local, path)
                return
            except OSError:  # another file system
                pass
        _local_write(uri, path, lambda tmp: shutil.copyfile(local, tmp))
        return
    with transfer("out"):
        with_retry(f"uploading {local} to {uri}", lambda: fs.put_file(local, path))


def get_file(uri: str, local: str) -> None:
    fs, path = split(uri)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with transfer("in"):
            with_retry(f"downloading {uri}", lambda: fs.get_file(path, tmp))
        os.replace(tmp, local)
    except FileNotFoundError:
        raise BadInput(f"{uri}: no such file") from None
    finally:
        _discard(tmp)


def copy(src: str, dst: str) -> str:
    """`dst` becomes a copy of `src` without the bytes passing through this process where the storage allows it:
    a hard link between local paths (safe because writers here replace files, never rewrite them in place), a
    server-side copy within one object store; otherwise a download and an upload. Returns how: link, server or
    transfer."""
    if is_local(src) and is_local(dst):
        source, path = local_path(src), local_path(dst)
        how = "link"

        def link_or_copy(tmp: str) -> None:
            nonlocal how
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or links not allowed
                how = "transfer"
                shutil.copyfile(source, tmp)

        _local_write(dst, path, link_or_copy)
        return how
    src_fs, src_path = split(src)
    dst_fs, dst_path = split(dst)
    if src_fs is dst_fs:
        with transfer("out"):
            with_retry(f"copying {src} to {dst}", lambda: src_fs.copy(src_path, dst_path))
        return "server"

    with tempfile.TemporaryDirectory(prefix="mysproj-copy-") as tmp:
        local = os.path.join(tmp, "file")
        get_file(src, local)
        put_file(local, dst)
    return "transfer"


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = split(uri)

    def _rm():
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    with_retry(f"removing {uri}", _rm)


def list_files(uri: str) -> list[str]:
    """All files below `uri`, as paths relative to it (sorted)."""
    fs, path = split(uri)
    if not with_retry(f"listing {uri}", lambda: fs.exists(path)):
        return []
    found = with_retry(f"listing {uri}", lambda: fs.find(path))
    base = path.rstrip("/") + "/"
    return sorted(p[len(base):] if p.startswith(base) else p for p in found)


def list_dirs(uri: str) -> list[str]:
    fs, path = split(uri)
    if not with_retry(f"listing {uri}", lambda: fs.exists(path)):
        return []
    entries = with_retry(f"listing {uri}", lambda: fs.ls(path, detail=True))
    return sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")


def size(uri: str) -> int:
    fs, path = split(uri)
    return int(with_retry(f"stat {uri}", lambda: fs.info(path))["size"])
