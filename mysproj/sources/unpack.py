"""Unpack a downloaded archive safely: the kind is read from the bytes (a `.tar.gz` may be a plain tar), every
member is checked before anything is written (no `..`, no absolute names, no link leaving the tree), macOS
metadata (`__MACOSX/`, `._*`) is skipped, and odd names (`?`, `&`, `%20`, spaces) are kept exactly."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile

from mysproj.errors import BadInput

_TAR_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}


def kind(path: str) -> str | None:
    """'zip', 'tar', 'tar.gz', 'tar.bz2', 'tar.xz' from the first bytes, or None for any other file."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for magic, comp in _TAR_MAGIC.items():
        if head.startswith(magic):
            try:
                with tarfile.open(path, f"r:{comp}") as t:
                    t.next()
                return f"tar.{comp}"
            except (tarfile.TarError, OSError, EOFError):
                return None  # a compressed single file, not a tar
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def _skipped(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _check_name(archive: str, name: str) -> str:
    """The member's relative path, or BadInput when it would land outside the destination."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise BadInput(f"{archive}: member {name!r} has an absolute name; refusing to unpack this archive")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"{archive}: member {name!r} points outside the archive's folder (..); refusing to "
                       f"unpack this archive")
    return "/".join(parts)


def _check_link(archive: str, name: str, target: str) -> None:
    if target.startswith("/") or ".." in os.path.normpath(os.path.join(os.path.dirname(name), target)).split("/"):
        raise BadInput(f"{archive}: member {name!r} links to {target!r} outside the archive's folder; refusing "
                       f"to unpack this archive")


def unpack(archive: str, dest: str, *, into: str = "") -> list[str]:
    """Unpack `archive` below `dest/into`; returns the relative names (from `dest`) of the files written. A
    file that is no archive is placed there as it is."""
    target = os.path.join(dest, into) if into else dest
    os.makedirs(target, exist_ok=True)
    found = kind(archive)
    prefix = f"{into.strip('/')}/" if into else ""
    if found is None:
        name = os.path.basename(archive)
        out = os.path.join(target, name)
        if os.path.abspath(out) != os.path.abspath(archive):
            shutil.copyfile(archive, out)
        return [prefix + name]
    if found == "zip":
        return [prefix + n for n in _unzip(archive, target)]
    return [prefix + n for n in _untar(archive, target)]


# tarfile's extraction filters came with Python 3.12 and 3.11.4; Debian 12's 3.11.2 (the offline image base) lacks
# them, so there the members are made safe here the way the `data` filter would.
HAS_FILTERS = hasattr(tarfile, "data_filter")


def _untar(archive: str, target: str) -> list[str]:
    with tarfile.open(archive, "r:*") as t:
        members = []
        for m in t.getmembers():
            if _skipped(m.name):
                continue
            m.name = _check_name(archive, m.name) or "."
            if m.issym():
                _check_link(archive, m.name, m.linkname)
            elif m.islnk():
                _check_name(archive, m.linkname)
            elif not (m.isfile() or m.isdir()):
                raise BadInput(f"{archive}: member {m.name!r} is a device or a pipe; refusing to unpack this archive")
            if not HAS_FILTERS:  # no set-id bits, no writes for others, no owners taken from the archive
                m.mode = (m.mode & 0o755) | (0o600 if m.isfile() else 0o700)
                m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
            members.append(m)
        if not HAS_FILTERS:
            t.extractall(target, members=members)  # nosec B202 - each member checked above, as the data filter does
            return sorted(m.name for m in members if m.isfile() or m.islnk())
        try:
            t.extractall(target, members=members, filter="data")
        except tarfile.FilterError as e:
            raise BadInput(f"{archive}: {e}; refusing to unpack this archive") from None
    return sorted(m.name for m in members if m.isfile() or m.islnk())


def _unzip(archive: str, target: str) -> list[str]:
    try:
        z = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise BadInput(f"{archive}: not a readable zip ({e}); fetch it again") from None
    with z:
        plan = []
        for info in z.infolist():
            if _skipped(info.filename):
                continue
            rel = _check_name(archive, info.filename)
            if not rel:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                link = z.read(info).decode("utf-8", "replace")
                _check_link(archive, rel, link)
                plan.append((info, rel, link))
            else:
                plan.append((info, rel, None))
        written = []
        for info, rel, link in plan:
            path = os.path.join(target, rel)
            if info.is_dir():
                os.makedirs(path, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if link is not None:
                if os.path.lexists(path):
                    os.remove(path)
                os.symlink(link, path)
            else:
                with z.open(info) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            written.append(rel)
    return sorted(written)
