"""fetch: a dataset or model from its public origin into a stage output, verified, once per cache.

The output of a fetch is an ordinary stage output, so every later stage reads it as it reads a folder: a dataset's
archives unpacked as published, or a model as an HF-layout safetensors folder (pickled `.bin` weights are
converted here, read with `weights_only=True`, so no later pod unpickles anything). Its folder is named by the
pinned origin (`<cache>/sources/<name>-<key>`), so the same origin is fetched once per bucket, whichever run or
release asks. Partial bytes live below the output (`_partial/`) until it is complete: a pod killed mid-download
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time

from mysproj import sources
from mysproj.config.fields import field_fetch_content, input_fields
from mysproj.config.stages import CLIP_ORIGIN, FetchConfig
from mysproj.errors import BadInput
from mysproj.sources.fetched import output_uri
from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.manifest import StageInput, run_stage
from mysproj.storage.stage_time import processed

log = logging.getLogger(__name__)
PARTIAL = "_partial"


def run(cfg: FetchConfig) -> dict:
    return run_stage("fetch", cfg, lambda out: _fetch(cfg, out))


def _fetch(cfg: FetchConfig, out) -> dict:
    local = next((u for u in cfg.source if not sources.is_remote(u)), None)
    if local is not None:
        raise BadInput(f"fetch: source {local} is a path or storage URI: stages read it in place, nothing to fetch")
    origins = [sources.resolve(sources.parse(u)) for u in cfg.source]
    t0 = time.monotonic()
    records = []
    with tempfile.TemporaryDirectory(prefix="mysproj-fetch-") as downloads, out.staging() as folder:
        fetched = []
        for i, origin in enumerate(origins):
            dest = os.path.join(downloads, str(i))
            os.makedirs(dest)
            records.append(sources.download(origin, dest, parts_uri=out.path(f"{PARTIAL}/{i}-{origin.key()}"),
                                            connections=cfg.connections, chunk_size=cfg.chunk_mib << 20))
            fetched.append(dest)
        download_s = time.monotonic() - t0
        summary = _place(cfg, origins, fetched, folder)
        out.put_dir(folder, move=True)
    U.remove(out.path(PARTIAL), recursive=True)
    total = sum(r.get("bytes_total", 0) for r in records)
    got = sum(r.get("bytes_fetched", 0) for r in records)
    mb_s = got / 1e6 / download_s if download_s > 0 and got else 0.0
    log.info("fetch: %s: %.1f MB fetched of %.1f MB (%.1f MB/s), %d files", out.uri, got / 1e6, total / 1e6, mb_s,
             len(out.files))
    return {**summary, "content": cfg.content, "origins": records, "bytes_total": total, "bytes_fetched": got,
            "download_s": round(download_s, 3), "mb_per_s": round(mb_s, 3),
            "processed": processed(round(got / 1e6), "MB", mb_s or None)}


def _place(cfg: FetchConfig, origins: list, fetched: list[str], folder: str) -> dict:
    """The downloaded files laid out in `folder` as the content's readers expect them."""
    if cfg.content in ("dataset", "files"):
        names = []
        for origin, dest in zip(origins, fetched):
            target = os.path.join(folder, origin.into) if origin.into else folder
            for name in sorted(os.listdir(dest)):
                path = os.path.join(dest, name)
                if cfg.content == "dataset" and os.path.isfile(path):  # archives unpacked, other files placed
                    names += sources.unpack(path, folder, into=origin.into)
                else:
                    os.makedirs(target, exist_ok=True)
                    shutil.move(path, os.path.join(target, name))
                    names.append(name)
        return {"unpacked_files": len(names)}
    from mysproj.models import snapshot  # noqa: PLC0415 - torch side: only model fetches need it (the CPU image fetches datasets)

    if len(fetched) != 1:
        raise BadInput(f"fetch: a {cfg.content} model comes from one origin; got {len(fetched)} in 'source'")
    if cfg.content == "clip":
        return snapshot.stage_clip(fetched[0], folder)
    return snapshot.stage_llava(fetched[0], folder, tower=_local_folder(cfg.tower) if cfg.tower else None)


def _local_folder(uri: str) -> str:
    """A local folder holding `uri`'s files: a stage output's verified against its manifest."""
    inp = StageInput.if_complete(uri)
    if inp is not None:
        return inp.local_dir()
    if U.is_local(uri):
        return U.local_path(uri)
    folder = cache.fetch_folder(uri)
    if folder is None:
        raise BadInput(f"{uri}: nothing stored there; expected the CLIP tower's folder")
    return folder


# -- origins named where a stage reads a path ---------------------------------------------------------------------

def cache_root(env=os.environ) -> str:
    """Where `stage_remote_inputs` keeps what it fetches: MYSPROJ_FETCH_CACHE, else the local cache folder."""
    return env.get("MYSPROJ_FETCH_CACHE") or os.path.join(cache.cache_dir(), "fetched")


def staged(source: list[str], content: str, root: str, tower: str | None = None) -> str:
    """The fetch output of `source` below `root`, fetched now unless complete already."""
    out = output_uri(root, source, content, tower)
    run(FetchConfig(source=source, out=out, content=content, tower=tower))
    return out


def stage_remote_inputs(cfg, root: str | None = None):
    """`cfg` with every input field that names a remote origin (https://, github://, hf://, kaggle://) replaced by
    that origin's fetch output, fetched first where needed. The pipeline adds fetch stages to its DAG instead, so
    its stages never see an origin; this serves a stage command run by hand (`mysproj prep --source https://…`)."""
    changes = {}
    for name, value in input_fields(cfg).items():
        if isinstance(value, str) and sources.is_remote(value):
            content = field_fetch_content(cfg, name)
            if content is None:
                raise BadInput(f"config field '{name}' = {value}: an origin URI is not accepted here; give a path "
                               f"or storage URI")
            root = root or cache_root()
            tower = staged([CLIP_ORIGIN], "clip", root) if content == "llava" else None
            changes[name] = staged([value], content, root, tower)
    return dataclasses.replace(cfg, **changes) if changes else cfg
