"""Hugging Face Hub origins (`hf://ORG/REPO@REV`, `hf://datasets/ORG/REPO@REV`) through huggingface_hub: the
revision is resolved to its full commit, the repo's files at that commit are listed with their sizes and digests,
and each file goes through the ranged, resumable engine (with huggingface_hub's headers, so HF_TOKEN is sent)
and is verified against the hub's LFS sha256, else its git blob id. HF_ENDPOINT and HF_TOKEN come from `env`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping

from mysproj.errors import BadInput, redact
from mysproj.sources import http, verify
from mysproj.sources.unpack import _check_name
from mysproj.storage import uri as storage

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_SECRET_HINT = "set HF_TOKEN (or the chart's hf Secret)"


def _endpoint(env: Mapping[str, str]) -> str:
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _token(env: Mapping[str, str]) -> str | None:
    return env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None


@contextlib.contextmanager
def _errors(origin, what: str, endpoint: str):
    """The hub's exceptions as one `BadInput` line (never with the token)."""
    from huggingface_hub import errors as hf  # noqa: PLC0415 - only fetches from the Hub

    rev = origin.revision or "main"
    try:
        yield
    except hf.GatedRepoError:
        raise BadInput(f"{origin.uri}: {origin.repo} is a gated repository; accept its terms on the hub with your "
                       f"account and {_SECRET_HINT}") from None
    except hf.RevisionNotFoundError:
        raise BadInput(f"{origin.uri}: revision {rev!r} not found in {origin.repo}; give an existing branch, tag "
                       f"or commit after '@'") from None
    except hf.RepositoryNotFoundError:
        raise BadInput(f"{origin.uri}: {origin.repo_type} repository {origin.repo} not found at "
                       f"{endpoint} (or revision {rev!r} missing, or it is private: {_SECRET_HINT})"
                       ) from None
    except hf.EntryNotFoundError as e:
        raise BadInput(f"{origin.uri}: {what}: not found in the repository ({redact(str(e)).splitlines()[0]})") \
            from None
    except hf.OfflineModeIsEnabled:
        raise BadInput(f"{origin.uri}: HF_HUB_OFFLINE is set; unset it where sources are fetched") from None
    except hf.HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise BadInput(f"{origin.uri}: the hub refused access ({code}); {_SECRET_HINT}") from None
        raise


def _call(origin, env, what: str, fn, retry_seconds: float | None = None):
    """A hub API call, retried on 5xx and connection failures for `retry_seconds`."""
    import httpx  # noqa: PLC0415 - only fetches over https
    from huggingface_hub import errors as hf  # noqa: PLC0415 - only fetches from the Hub

    budget = http.RETRY_SECONDS if retry_seconds is None else retry_seconds
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            with _errors(origin, what, _endpoint(env)):
                return fn()
        except (httpx.TransportError, hf.HfHubHTTPError) as e:
            code = getattr(getattr(e, "response", None), "status_code", None)
            transient = isinstance(e, httpx.TransportError) or (code is not None and (code >= 500 or code == 429))
            if not transient or time.monotonic() + delay > deadline:
                raise BadInput(f"{origin.uri}: {what} failed ({type(e).__name__}: "
                               f"{redact(str(e)).splitlines()[0]})") from None
            log.warning("%s: %s: %s; retrying in %.1fs", origin.uri, what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def _api(env: Mapping[str, str]):
    from huggingface_hub import HfApi  # noqa: PLC0415 - only fetches from the Hub

    return HfApi(endpoint=_endpoint(env), token=_token(env))


def resolve_commit(origin, *, env: Mapping[str, str] = os.environ, retry_seconds: float | None = None) -> str:
    """The full commit sha that `origin.revision` (a branch, tag or commit; None = main) names now."""
    api = _api(env)
    info = _call(origin, env, "resolving the revision", lambda: api.repo_info(
        origin.repo, repo_type=origin.repo_type, revision=origin.revision or "main"), retry_seconds)
    return info.sha


def list_files(origin, commit: str, *, env: Mapping[str, str] = os.environ, retry_seconds: float | None = None):
    """[(path, size, {"sha256": lfs} or {"git-sha1": blob id})] of the repository at `commit`."""
    from huggingface_hub.hf_api import RepoFile  # noqa: PLC0415 - only fetches from the Hub

    api = _api(env)
    entries = _call(origin, env, "listing the files", lambda: list(api.list_repo_tree(
        origin.repo, repo_type=origin.repo_type, revision=commit, recursive=True)), retry_seconds)
    out = []
    for e in entries:
        if not isinstance(e, RepoFile):
            continue
        path = _check_name(origin.uri, e.path)
        if e.lfs is not None and getattr(e.lfs, "sha256", None):
            out.append((path, int(e.lfs.size), {"sha256": e.lfs.sha256}))
        else:
            out.append((path, int(e.size), {"git-sha1": e.blob_id}))
    return sorted(out)


def download(origin, dest: str, *, parts_uri: str | None, env: Mapping[str, str] = os.environ,
             log: logging.Logger = log, **engine) -> dict:
    """Every file of the repository at the (resolved) commit into `dest`, verified."""
    from huggingface_hub import hf_hub_url  # noqa: PLC0415 - only fetches from the Hub
    from huggingface_hub.utils import build_hf_headers  # noqa: PLC0415 - only fetches from the Hub

    t0 = time.monotonic()
    retry = engine.get("retry_seconds")
    commit = origin.revision if origin.pinned else resolve_commit(origin, env=env, retry_seconds=retry)
    files = [f for f in list_files(origin, commit, env=env, retry_seconds=retry) if origin.wants(f[0])]
    if not files:
        raise BadInput(f"{origin.uri}: no file of {origin.repo} at {commit[:12]} matches include="
                       f"{','.join(origin.include) or '*'} exclude={','.join(origin.exclude) or '-'}")
    token = _token(env)
    headers = build_hf_headers(token=token if token else False)
    total = sum(size for _, size, _ in files)
    log.info("%s@%s: %d files, %.1f MB", origin.uri, commit[:12], len(files), total / 1e6)
    done: dict[str, verify.Fetched] = {}
    how = set()
    for path, size, expect in files:
        url = hf_hub_url(origin.repo, path, repo_type=origin.repo_type, revision=commit, endpoint=_endpoint(env))
        parts = None
        if parts_uri is not None:
            parts = storage.join(parts_uri, "files", hashlib.sha256(path.encode()).hexdigest()[:16])
        eng = http.Engine(url, headers, expect_binary=False, what=f"{origin.uri}: {path}", log=log, **engine)
        done[path] = eng.fetch(dest, path, parts_uri=parts, size=size, expect=expect, keep_parts=True)
        how.add("hub lfs sha256" if "sha256" in expect else "git blob oid")
    if parts_uri is not None:  # every file verified: a restart no longer needs them
        storage.remove(parts_uri, recursive=True)
    return verify.record(origin, commit, done, time.monotonic() - t0, " + ".join(sorted(how)) or "no files")
