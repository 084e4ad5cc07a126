"""torch.compile's caches kept under the run root, so that compiling a graph is paid once, not once per stage, pod
and re-run.

torch's end-to-end cache (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`, the "mega-cache") bundles
the FX graph, AOTAutograd, Triton kernel, autotuning and dynamic-shape (PGO) caches in one blob. Before a stage
compiles anything it loads every blob stored for its torch, Triton and device; the local caches then serve the
hits. After the stage it stores one blob, named by its content (so concurrent pods never overwrite each other),
if it compiled anything that was not loaded. A blob that cannot be read is skipped with a warning: the stage
compiles as if it were not there.

    <cache uri>/<torch-version>-triton-<version>-<device>/<sha256>.bin
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re

import torch

from mysproj.storage import uri as U

log = logging.getLogger(__name__)


def environment() -> str:
    """The folder name of the blobs this process can use: artifacts are valid for one torch, Triton and device."""

    try:
        import triton  # noqa: PLC0415 - optional: the except clause handles its absence

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"torch-{torch.__version__}-triton-{triton_version}-{device}")


def _keys(info) -> set[str]:
    return {f"{kind}/{key}" for kind, keys in (info.artifacts if info else {}).items() for key in keys}


def load(uri: str) -> set[str]:
    """Load every blob stored for this environment; returns the keys of the artifacts loaded."""

    folder = U.join(uri, environment())
    keys: set[str] = set()
    blobs = [n for n in U.list_files(folder) if n.endswith(".bin") and "/" not in n]
    for name in blobs:
        path = U.join(folder, name)
        try:
            info = torch.compiler.load_cache_artifacts(U.read_bytes(path))
        except Exception as e:  # noqa: BLE001 - a cache never fails the stage
            info, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            why = "not a torch.compile cache blob"
        if info is None:
            log.warning("compile cache: %s is unreadable (%s); compiling without it", path, why)
            continue
        keys |= _keys(info)
    if blobs:
        log.info("compile cache: %d artifacts from %d blobs under %s", len(keys), len(blobs), folder)
    return keys


def _forget_recorded() -> None:
    """Start the process's record of compiled artifacts afresh: `save_cache_artifacts` returns everything recorded
    since the process began, so a stage run after others in one process (the local runner's) would otherwise store
    their artifacts again, and report a blob when it compiled nothing. torch has no public call for it."""
    try:
        from torch.compiler._cache import CacheArtifactManager  # noqa: PLC0415 - optional: the except clause handles its absence
    except ImportError:
        return
    CacheArtifactManager.clear()


def save(uri: str, known: set[str]) -> str | None:
    """Store what this process compiled, unless all of it was loaded; returns the blob's name or None."""

    saved = torch.compiler.save_cache_artifacts()
    if saved is None or _keys(saved[1]) <= known:
        return None
    blob = saved[0]
    name = hashlib.sha256(blob).hexdigest()[:32] + ".bin"
    path = U.join(uri, environment(), name)
    try:
        U.write_bytes(path, blob)
    except Exception as e:  # noqa: BLE001 - a cache never fails the stage
        log.warning("compile cache: could not store %s (%s: %s)", path, type(e).__name__, e)
        return None
    log.info("compile cache: stored %d artifacts as %s", len(_keys(saved[1])), path)
    return name


@contextlib.contextmanager
def persistent(uri: str | None, *, store: bool = True):
    """Around the code that compiles: load before, store after (not after a failure). Yields a dict for the
    stage's summary (`loaded`: artifacts, `stored`: blob name or None); nothing happens without a `uri`."""
    if not uri:
        yield {}
        return
    stats: dict = {"uri": uri}
    _forget_recorded()
    try:
        known = load(uri)
    except Exception as e:  # noqa: BLE001 - e.g. storage unreachable: compile without the cache
        log.warning("compile cache: cannot read %s (%s: %s); compiling without it", uri, type(e).__name__, e)
        known = set()
    stats["loaded"] = len(known)
    yield stats
    stats["stored"] = save(uri, known) if store else None


def run_with(uri: str | None, body, *, store: bool = True) -> dict:
    """`body()` (a stage body returning its summary) inside `persistent(uri)`; the summary gains `compile_cache`."""
    with persistent(uri, store=store) as cache:
        summary = body() or {}
    if cache:
        summary["compile_cache"] = cache
    return summary
