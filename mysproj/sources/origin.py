"""Where a dataset or a model comes from, named by its public origin: an http(s) URL (pinned with pip's
`#sha256=HEX`), a Hugging Face Hub repo (`hf://ORG/REPO@REV`), a Kaggle dataset
(`kaggle://OWNER/DATASET/versions/N`), or storage the project reads in place (a path, file://, s3://).

`parse` checks the syntax only; `resolve` asks the origin to pin what can be pinned; `download` fetches and
verifies the bytes (the transports live in `http`, `hub` and `kaggle` beside this module)."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, replace

from mysproj.errors import BadInput, has_uri_credentials, redact
from mysproj.sources import github, http, hub, kaggle
from mysproj.storage.uri import check_uri

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ARCHIVE_EXT = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip", ".gz")
REMOTE_SCHEMES = ("http://", "https://", "hf://", "kaggle://", "github://")


@dataclass(frozen=True)
class Origin:
    scheme: str  # "http" (http/https), "hf", "kaggle", "storage" (path, file://, s3://)
    uri: str  # as given, without secrets; for http the URL without the #fragment
    sha256: str | None = None  # http: the pin from `URL#sha256=HEX`
    into: str = ""  # `#...&into=sub/dir`: unpack below this sub-folder
    repo: str = ""  # hf: ORG/REPO; kaggle: OWNER/DATASET
    repo_type: str = "model"  # hf: "model" | "dataset"
    revision: str | None = None  # hf: branch/tag/commit; kaggle: version number
    include: tuple[str, ...] = ()  # hf: `#include=*.json,*.safetensors`: only files matching one of these globs
    exclude: tuple[str, ...] = ()  # hf: `#exclude=*.h5,*.msgpack`: leave files matching these out

    def wants(self, path: str) -> bool:
        """Whether a repository file belongs to this origin (its include/exclude globs)."""

        if self.include and not any(fnmatch.fnmatchcase(path, g) for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(path, g) for g in self.exclude)

    @property
    def pinned(self) -> bool:
        if self.scheme == "http":
            return self.sha256 is not None
        if self.scheme in ("hf", "github"):
            return bool(self.revision and _COMMIT.match(self.revision))
        if self.scheme == "kaggle":
            return bool(self.revision)
        return True  # storage is read in place; its content keys belong to the reader

    def canonical(self) -> str:
        """The origin as one string that names exactly the bytes it stands for (what `key` digests)."""
        if self.scheme == "http":
            text = f"http {self.uri} sha256={self.sha256 or ''}"
        elif self.scheme == "hf":
            text = f"hf {self.repo_type} {self.repo} {self.revision or 'main'}"
        elif self.scheme == "kaggle":
            text = f"kaggle {self.repo} {self.revision or 'latest'}"
        elif self.scheme == "github":
            text = f"github {self.repo} {self.revision or 'HEAD'}"
        else:
            text = f"storage {self.uri}"
        for label, globs in (("include", self.include), ("exclude", self.exclude)):
            if globs:
                text += f" {label}={','.join(globs)}"
        return f"{text} into={self.into}" if self.into else text

    def key(self) -> str:
        """A short stable hex digest of the canonical origin: the same origin gives the same key."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def name(self) -> str:
        """A short human slug: `dtd-r1.0.1`, `llava-v1.5-7b`, `dermnet`."""
        if self.scheme in ("hf", "kaggle", "github"):
            base = self.repo.rsplit("/", 1)[-1]
        else:
            path = urllib.parse.urlsplit(self.uri).path if "://" in self.uri else self.uri
            base = os.path.basename(path.rstrip("/")) or "source"
            base = urllib.parse.unquote(base)
            for ext in _ARCHIVE_EXT:
                if base.lower().endswith(ext) and len(base) > len(ext):
                    base = base[: -len(ext)]
                    break
        slug = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.")
        return slug[:60] or "source"


def is_remote(uri: str) -> bool:
    """http(s)://, hf:// or kaggle:// (fetched by a fetch stage), as opposed to storage read in place."""
    return str(uri).lower().startswith(REMOTE_SCHEMES)


def _fragment(uri: str, fragment: str) -> dict[str, str]:
    if not fragment:
        return {}
    out: dict[str, str] = {}
    for part in fragment.split("&"):
        key, eq, value = part.partition("=")
        if not eq or key not in ("sha256", "into", "include", "exclude") or key in out:
            raise BadInput(f"{redact(uri)}: unknown or repeated '#{part}'; the fragment takes sha256=HEX (https), "
                           f"include=GLOB,GLOB and exclude=GLOB,GLOB (hf://) and into=sub/dir, joined by '&'")
        out[key] = urllib.parse.unquote(value)
    if "into" in out:
        into = out["into"].strip("/")
        parts = into.split("/")
        if not into or any(p in ("", ".", "..") for p in parts) or "\\" in into:
            raise BadInput(f"{redact(uri)}: into={out['into']!r} must be a relative sub-folder without '..'")
        out["into"] = into
    return out


def _only(uri: str, frag: dict[str, str], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(frag) - set(allowed))
    if extra:
        raise BadInput(f"{redact(uri)}: '{extra[0]}=' does not apply to this kind of source (it takes "
                       f"{', '.join(a + '=' for a in allowed)})")


def _globs(text: str | None) -> tuple[str, ...]:
    return tuple(sorted({g.strip() for g in (text or "").split(",") if g.strip()}))


def _slug_pair(uri: str, text: str, what: str) -> str:
    parts = text.split("/")
    if len(parts) != 2 or not all(_SLUG.match(p) for p in parts):
        raise BadInput(f"{uri}: expected {what}, got {text!r}")
    return text


def parse(uri: str) -> Origin:
    """The origin `uri` names; `BadInput` naming the URI when it is malformed."""
    uri = str(uri).strip()
    if not uri:
        raise BadInput("empty source URI; give a path, s3://, https://…#sha256=HEX, hf://ORG/REPO@REV or "
                       "kaggle://OWNER/DATASET")
    if has_uri_credentials(uri):
        raise BadInput(f"{redact(uri)}: credentials inside a URI are refused; give them through the environment "
                       f"(HF_TOKEN, KAGGLE_API_TOKEN, ...) and use the URI without them")
    lower = uri.lower()
    base, _, fragment = uri.partition("#")
    if lower.startswith(("http://", "https://")):
        parsed = urllib.parse.urlsplit(base)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise BadInput(f"{uri}: an http(s) source needs a host and a file path")
        frag = _fragment(uri, fragment)
        _only(uri, frag, ("sha256", "into"))
        sha = frag.get("sha256")
        if sha is not None and not _HEX64.match(sha):
            raise BadInput(f"{uri}: sha256={sha!r} is not 64 hex digits")
        return Origin("http", base, sha.lower() if sha else None, frag.get("into", ""))
    if lower.startswith("hf://"):
        frag = _fragment(uri, fragment)
        rest = base[len("hf://"):].strip("/")
        repo_type = "model"
        for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
            if rest.startswith(prefix):
                rest, repo_type = rest[len(prefix):], kind
        repo, at, rev = rest.partition("@")
        if at and not rev:
            raise BadInput(f"{uri}: empty revision after '@'")
        _slug_pair(uri, repo, "hf://ORG/REPO[@REVISION] or hf://datasets/ORG/REPO[@REVISION]")
        _only(uri, frag, ("into", "include", "exclude"))
        return Origin("hf", base, into=frag.get("into", ""), repo=repo, repo_type=repo_type, revision=rev or None,
                      include=_globs(frag.get("include")), exclude=_globs(frag.get("exclude")))
    if lower.startswith("kaggle://"):
        frag = _fragment(uri, fragment)
        _only(uri, frag, ("into",))
        rest = base[len("kaggle://"):].strip("/")
        parts = rest.split("/")
        version = None
        if len(parts) == 4 and parts[2] == "versions":
            if not parts[3].isdigit() or int(parts[3]) < 1:
                raise BadInput(f"{uri}: the version must be a positive number, got {parts[3]!r}")
            version, parts = str(int(parts[3])), parts[:2]
        repo = _slug_pair(uri, "/".join(parts), "kaggle://OWNER/DATASET[/versions/N]")
        return Origin("kaggle", base, into=frag.get("into", ""), repo=repo, revision=version)
    if lower.startswith("github://"):
        frag = _fragment(uri, fragment)
        repo, at, rev = base[len("github://"):].strip("/").partition("@")
        if at and not rev:
            raise BadInput(f"{uri}: empty commit after '@'")
        _slug_pair(uri, repo, "github://OWNER/REPO[@COMMIT]")
        return Origin("github", base, into=frag.get("into", ""), repo=repo, revision=rev or None)
    if "#" in uri and "://" not in uri:
        raise BadInput(f"{uri}: '#' pins and into= apply to http(s), hf:// and kaggle:// sources only")

    check_uri(uri)
    return Origin("storage", uri)


def resolve(origin: Origin, *, env: Mapping[str, str] = os.environ) -> Origin:
    """`origin` pinned as far as its origin can tell: a hub revision becomes its full commit, a Kaggle dataset
    gets its current version number. http without a sha256 stays unpinned (download records its digest)."""
    if origin.scheme == "hf" and not origin.pinned:
        return replace(origin, revision=hub.resolve_commit(origin, env=env))
    if origin.scheme == "github" and not origin.pinned:
        return replace(origin, revision=github.resolve_commit(origin, env=env))
    if origin.scheme == "kaggle" and not origin.pinned:
        return replace(origin, revision=kaggle.current_version(origin, env=env))
    return origin


def download(origin: Origin, dest: str, *, parts_uri: str | None = None, env: Mapping[str, str] = os.environ,
             log: logging.Logger = log, **engine) -> dict:
    """Fetch the origin's file(s) into local folder `dest`, verified; returns the manifest record (origin,
    revision, files with size and sha256, bytes fetched and total, seconds, MB/s, how it was verified).
    `parts_uri` (a path or s3://...) keeps partial bytes across a killed process; None = a temporary folder.
    `engine`: `chunk_size`, `connections`, `retry_seconds` for the ranged HTTP engine."""
    if origin.scheme == "http":
        return http.download_origin(origin, dest, parts_uri=parts_uri, env=env, log=log, **engine)
    if origin.scheme == "hf":
        return hub.download(origin, dest, parts_uri=parts_uri, env=env, log=log, **engine)
    if origin.scheme == "github":
        return github.download(origin, dest, parts_uri=parts_uri, env=env, log=log, **engine)
    if origin.scheme == "kaggle":
        return kaggle.download(origin, dest, parts_uri=parts_uri, env=env, log=log, **engine)
    return {"origin": origin.uri, "revision": None, "files": {}, "bytes_fetched": 0, "bytes_total": 0,
            "seconds": 0.0, "mb_per_s": 0.0, "verified": "read in place"}

from mysproj.sources.unpack import unpack  # noqa: E402,F401  (one import place for the fetch stage)
