"""Where a fetch output lives below a cache root. The pipeline's DAG names fetch outputs before any fetch runs, so
this stays below the stages, with no ML imports."""

from __future__ import annotations

import hashlib

from mysproj.sources.origin import parse
from mysproj.storage import uri as U


def output_uri(cache_root: str, source: list[str], content: str, tower: str | None = None) -> str:
    """Where the fetch of `source` lives below a cache root: named by the origins as pinned (and the tower a LLaVA
    in the original layout is completed with), so equal origins share one output."""
    origins = [parse(u) for u in source]
    blob = "\n".join([content, *(o.key() for o in origins), tower or ""])
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return U.join(cache_root, "sources", f"{origins[0].name()}-{key}")
