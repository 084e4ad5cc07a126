"""Read, hash and fully decode every candidate image once, on all cores, with a progress line.

Work is sent to worker processes in chunks of `CHUNK` images, so a progress line comes at least every chunk.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from mysproj.data.images import DEFAULT_MAX_PIXELS, ImageCheck, check_bytes
from mysproj.progress import Progress
from mysproj.storage import uri as U

CHUNK = 32


def _check_chunk(uris: list[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageCheck]:
    results = []
    for uri in uris:
        fs, path = U.split(uri)  # one client per process (storage.uri caches it)
        try:
            data = U.with_retry(f"reading {uri}", lambda p=path, f=fs: f.cat_file(p))
        except (FileNotFoundError, IsADirectoryError):
            results.append(ImageCheck(None, None, None, "missing"))
            continue
        except OSError as e:
            if U.is_local(uri):  # unreadable local file (permissions, I/O error): report, don't crash
                results.append(ImageCheck(None, None, None, f"unreadable ({type(e).__name__}: {e})"))
                continue
            raise
        results.append(check_bytes(data, max_pixels))
    return results


def effective_workers(workers: int) -> int:
    return workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count() or 1)


def check_images(uris: list[str], workers: int = 0, what: str = "checking images",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageCheck]:
    """One `ImageCheck` per URI, in order. `workers=0` uses every core; images above `max_pixels` are reported,
    not decoded."""
    check_chunk = partial(_check_chunk, max_pixels=max_pixels)
    progress = Progress(what, len(uris), "images")
    n = min(effective_workers(workers), max(1, len(uris) // CHUNK))
    chunks = [uris[i:i + CHUNK] for i in range(0, len(uris), CHUNK)]
    results: list[ImageCheck] = []
    if n <= 1:
        for chunk in chunks:
            results.extend(check_chunk(chunk))
            progress.update(len(chunk))
        return results
    # spawn, not fork: the parent may hold fsspec's event-loop thread and open connections.
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        for chunk_results in pool.map(check_chunk, chunks):
            results.extend(chunk_results)
            progress.update(len(chunk_results))
    return results
