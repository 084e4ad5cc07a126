"""Stage outputs become visible as complete only when `_SUCCESS.json` is written, last.

The manifest lists every file with its size and sha256, their content digest, the stage config and its hash, the
content digest of each input (`mysproj.storage.digest`), the code version and start/end times. Readers
(`StageInput`) refuse a folder without one and verify each file's hash as they fetch it. `StageOutput.existing()`
is the one test of "complete with this config and these inputs" that `run_stage`, the Kubernetes controller and
`mysproj status` share; a stage that passes it is skipped.

`run_stage` refuses an output that is empty, the file system root, equal to or inside one of the stage's inputs (or
holding one), and writes only while it holds the output's lease (`mysproj.storage.lease`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from mysproj import __version__
from mysproj.errors import BadInput, IncompleteOutput
from mysproj.storage import cache, lease, s3_upload
from mysproj.storage import uri as U
from mysproj.storage.cache import sha256_file
from mysproj.storage.config_key import config_hash, config_to_dict
from mysproj.storage.digest import MANIFEST, changed_input, content_digest, input_digests, read_manifest
from mysproj.storage.s3_transfer import is_s3
from mysproj.storage.stage_time import GpuUse, time_entry, transfer_seconds

log = logging.getLogger(__name__)
# `--force`: run even when the output is complete, and replace a complete output of another stage.
_FORCE: ContextVar[bool] = ContextVar("mysproj_force", default=False)
_UNREAD = object()  # `StageOutput._found` before `existing()` has looked


@contextmanager
def forcing(force: bool) -> Iterator[None]:
    token = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(token)


def code_version() -> str:
    sha = os.environ.get("MYSPROJ_GIT_SHA", "")
    return f"{__version__}+{sha[:12]}" if sha else __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageOutput:
    """Collects a stage's files under `out_uri`, recording size and sha256, and commits the manifest last."""

    def __init__(self, out_uri: str, stage: str, cfg: Any, *, inputs: dict | None = None):
        """`inputs`: the input digests when the caller already has them (a run's checkpoints take the run's)."""
        if not str(out_uri).strip():
            raise BadInput(f"{stage}: config field 'out' is empty (an unset shell variable?); pass --out FOLDER")
        self.uri = str(out_uri).rstrip("/")
        if U.is_local(out_uri) and os.path.realpath(U.local_path(out_uri)) == "/" or self.uri.endswith(":"):
            raise BadInput(f"{stage}: --out {out_uri!r} is the file system root; pass a folder to write into")
        U.check_uri(self.uri)
        self.stage = stage
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.files: dict[str, dict] = {}
        self.started = _now()
        self.reason: str | None = None  # why `existing()` found nothing to reuse (None: no output there yet)
        self._inputs = inputs
        self._found: Any = _UNREAD  # the manifest `existing()` read (None: there was none), for `begin` to reuse
        self._early: dict = {}  # local path -> upload started by `sender` before `put_dir`
        self._sending = None

    @property
    def inputs(self) -> dict:
        """{input field: content digest} now (computed once per instance, unless given to the constructor)."""
        if self._inputs is None:
            self._inputs = input_digests(self.cfg, exclude=self.uri)
        return self._inputs

    def check_place(self) -> None:
        """`BadInput` where writing the output would change an input: `out` equal to or inside an input (a model
        folder without a manifest would be overwritten), or an input inside `out`. A field declared
        `opt(..., holds_out=True)` (report's run roots) may hold the output: its digest leaves the output out."""

        out = U.canonical(self.uri)
        for f in dataclasses.fields(self.cfg):
            if not f.metadata.get("input"):
                continue
            value = getattr(self.cfg, f.name)
            for v in value if isinstance(value, list) else [value] if value else []:
                where = U.canonical(v)
                if out == where or (U.contains(where, out) and not f.metadata.get("holds_out")):
                    raise BadInput(f"{self.stage}: --out {self.uri} is {'' if out == where else 'inside '}its input "
                                   f"'{f.name}' ({v}); writing there would change that input: pick another --out")
                if U.contains(out, where):
                    raise BadInput(f"{self.stage}: input '{f.name}' ({v}) lies inside --out {self.uri}; writing "
                                   f"the output could change it: pick another --out")

    def existing(self) -> dict | None:
        """The manifest of a finished run of this stage with this same config and inputs of the same content, if
        any; otherwise None, with `reason` saying why an output that is there does not count."""
        self.reason = None
        m = self._found = read_manifest(self.uri)
        if not m:
            return None
        if m.get("stage") != self.stage:
            self.reason = f"it holds a '{m.get('stage')}' output"
        elif m.get("config_hash") != self.hash:
            self.reason = f"its config changed (hash {m.get('config_hash')} -> {self.hash})"
        elif m.get("inputs") is None and self.inputs:
            self.reason = "its manifest records no input digests (written by an older mysproj)"
        else:
            name = changed_input(m.get("inputs") or {}, self.inputs)
            if name is None:
                return m
            self.reason = f"input '{name}' ({getattr(self.cfg, name)}) changed since it was made"
        return None

    def begin(self, force: bool = False) -> None:
        U.make_dirs(self.uri)
        if not force:
            m = read_manifest(self.uri) if self._found is _UNREAD else self._found
            if m and m.get("stage") != self.stage:
                raise BadInput(f"{self.uri} holds a complete '{m.get('stage')}' output; refusing to overwrite it "
                               f"with {self.stage}: pick another --out, or pass --force to replace it")
        self.inputs  # noqa: B018 - the inputs as they are when the work starts are what the manifest records
        # A re-run with a new config rewrites files in place: drop the old manifest first so that no reader
        # can take the half-rewritten folder for a complete one.
        U.remove(U.join(self.uri, MANIFEST))
        self.started = _now()

    def path(self, name: str) -> str:
        return U.join(self.uri, name)

    def _record(self, name: str, size: int, sha: str, parts: dict | None = None) -> None:
        """`parts`: the part digests of an object uploaded in parts (`mysproj.storage.s3_transfer`)."""
        self.files[name] = {"size": size, "sha256": sha, **({"parts": parts} if parts else {})}

    def write_bytes(self, name: str, data: bytes) -> str:
        U.write_bytes(self.path(name), data)
        self._record(name, len(data), hashlib.sha256(data).hexdigest())
        return self.path(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> str:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def put_file(self, local: str, name: str, sha256: str | None = None, move: bool = False) -> str:
        """Store `local` as `name`; `sha256` if already known; `move`: the local file may be taken (`uri.put_file`)."""
        size, sha = os.path.getsize(local), sha256 or sha256_file(local)
        parts = None
        if is_s3(self.uri):
            parts = s3_upload.upload(local, self.path(name))
        else:
            U.put_file(local, self.path(name), move=move)
        self._record(name, size, sha, parts)
        return self.path(name)

    def copy_file(self, src_uri: str, name: str, entry: dict) -> str:
        """`name` as a copy of another stage output's file, recorded with that file's manifest `entry` (size,
        sha256) instead of being re-read and re-hashed; readers verify it as any other file. Returns how it was
        copied (`uri.copy`)."""
        how = U.copy(src_uri, self.path(name))
        # part digests hold for a byte-for-byte copy (a server-side copy or a transfer alike)
        self._record(name, int(entry["size"]), entry["sha256"], entry.get("parts"))
        return how

    def put_dir(self, local_dir: str, prefix: str = "", move: bool = False) -> None:
        """Store every file under `local_dir` (hashed in parallel: a model's shards are GBs each)."""

        files = []
        for root, _, names in os.walk(local_dir):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                files.append((full, f"{prefix}/{rel}" if prefix else rel))
        inside = os.path.join(os.path.abspath(local_dir), "")
        early = {path: self._early.pop(path) for path in list(self._early) if path.startswith(inside)}
        files = [(full, name) for full, name in files if os.path.abspath(full) not in early]
        if is_s3(self.uri):
            # each file hashed and uploaded by one worker (its upload is concurrent in itself): a shard's hashing
            # overlaps another's upload, and the parts in flight stay a few GB
            with ThreadPoolExecutor(max_workers=max(1, min(2, len(files)))) as pool:
                list(pool.map(lambda item: self.put_file(*item), files))
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
                hashes = list(pool.map(sha256_file, [full for full, _ in files]))
            for (full, name), sha in zip(files, hashes):
                self.put_file(full, name, sha, move=move)
        for future in early.values():
            future.result()

    def sender(self, local_dir: str, prefix: str = ""):
        """A callback `f(path)` for a writer of files into `local_dir` (a `staging()` folder): each finished file is
        stored at once, in the background, while the writer goes on, and then removed (s3 outputs: a model's
        shards never all sit on local disk together; elsewhere it does nothing, the move of `put_dir` costs
        nothing). `put_dir(local_dir)` then waits for those instead of storing them again."""

        def store(path: str, name: str) -> None:
            self.put_file(path, name)
            os.remove(path)

        def send(path: str) -> None:
            if not is_s3(self.uri):
                return
            if self._sending is None:
                self._sending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-out")
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            self._early[os.path.abspath(path)] = self._sending.submit(store, path, f"{prefix}/{rel}" if prefix else rel)

        return send

    @contextlib.contextmanager
    def staging(self):
        """A local folder to write files into before `put_dir(folder, move=True)`: inside the output folder when
        that is local (handing a file over is then a rename, not a copy of GBs; leftovers of a killed writer are
        removed here), else a temporary folder."""

        if U.is_local(self.uri):
            root = U.local_path(self.uri)
            os.makedirs(root, exist_ok=True)
            for stale in glob.glob(os.path.join(root, ".staging-*")):
                shutil.rmtree(stale, ignore_errors=True)
            folder = tempfile.mkdtemp(prefix=".staging-", dir=root)
        else:
            folder = tempfile.mkdtemp(prefix="mysproj-staging-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit(self, summary: dict | None = None) -> dict:
        manifest = {
            "stage": self.stage,
            "config": config_to_dict(self.cfg),
            "config_hash": self.hash,
            "code_version": code_version(),
            "host": socket.gethostname(),
            "started": self.started,
            "finished": _now(),
            "files": dict(sorted(self.files.items())),
            "digest": content_digest(self.files),
            "inputs": self.inputs,
            "summary": summary or {},
        }
        U.write_text(U.join(self.uri, MANIFEST), json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest


def run_stage(stage: str, cfg: Any, body: Callable[[StageOutput], dict | None], *, force: bool | None = None) -> dict:
    """Run `body` unless `StageOutput.existing()` finds the output complete; commit the manifest last, its summary
    holding the stage's `time` entry (`mysproj.storage.stage_time`). `force` (default: `--force` of the command,
    see `forcing`) runs it anyway, also over another stage's output."""
    force = _FORCE.get() if force is None else force
    out = StageOutput(cfg.out, stage, cfg)
    out.check_place()
    done = None if force else out.existing()
    if done:
        return _skipped(out, done)
    U.make_dirs(out.uri)
    with lease.held(out.uri, stage) as held:
        # Looked again under the lease: another writer may have finished it since the look above, while this one
        # waited for the lease or just before it took a lease already given back.
        if not force:
            done = out.existing()
            if done:
                return _skipped(out, done)
        out.begin(force)
        if out.reason:
            log.info("%s: %s runs again: %s", stage, out.uri, out.reason)
        gpus = GpuUse()
        moved = transfer_seconds()
        t0 = time.monotonic()
        summary = body(out) or {}
        wall_s = time.monotonic() - t0
        summary.setdefault("seconds", round(wall_s, 3))
        moved = {d: s - moved[d] for d, s in transfer_seconds().items()}
        summary["time"] = time_entry(summary, wall_s, gpus.held(), moved, gpus.peak_gib())
        held.check()
        manifest = out.commit(summary)
    log.info("%s: wrote %s (%d files)", stage, out.uri, len(out.files))
    return manifest


def _skipped(out: StageOutput, done: dict) -> dict:
    log.info("%s: %s already complete (config %s, same inputs); skipping", out.stage, out.uri, out.hash)
    done["skipped"] = True
    return done


class StageInput:
    """A complete stage output, read with its files verified against the manifest."""

    def __init__(self, uri: str, expect_stage: str | tuple[str, ...] | None = None, *, manifest: dict | None = None):
        self.uri = str(uri).rstrip("/")
        m = manifest if manifest is not None else read_manifest(self.uri)
        if m is None:
            raise IncompleteOutput(f"{self.uri} is not a complete stage output (no {MANIFEST}, or a damaged one); run "
                                   f"the stage that writes it first")
        stages = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
        if stages and m.get("stage") not in stages:
            raise IncompleteOutput(f"{self.uri} holds a '{m.get('stage')}' output; expected {' or '.join(stages)}")
        self.manifest = m
        self.files: dict[str, dict] = m.get("files", {})

    @classmethod
    def if_complete(cls, uri: str, expect_stage: str | tuple[str, ...] | None = None) -> StageInput | None:
        """The stage output at `uri`, or None where `uri` has no manifest (a plain folder); one manifest read."""
        m = read_manifest(str(uri).rstrip("/"))
        return None if m is None else cls(uri, expect_stage, manifest=m)

    def path(self, name: str) -> str:
        return U.join(self.uri, name)

    def _entry(self, name: str) -> dict:
        if name not in self.files:
            raise IncompleteOutput(f"{self.uri}: '{name}' is not listed in its {MANIFEST}; re-run its stage")
        return self.files[name]

    def read_bytes(self, name: str) -> bytes:
        entry = self._entry(name)
        data = U.read_bytes(self.path(name))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise IncompleteOutput(f"{self.path(name)}: sha256 does not match {MANIFEST}; the file is corrupt or "
                                   f"was changed after the stage finished; re-run the stage")
        return data

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def local_path(self, name: str) -> str:
        """A verified local copy (cached by content hash; local outputs are verified in place)."""
        entry = self._entry(name)
        return cache.fetch(self.path(name), entry["sha256"], parts=entry.get("parts"), size=entry.get("size"))

    def local_dir(self, prefix: str = "", names: list[str] | None = None) -> str:
        """Materialise every manifest file under `prefix` (or only `names`, which lie under it) into one local
        folder (e.g. a model directory). Local outputs are the folder itself, verified in place."""

        if names is None:
            names = [n for n in self.files if not prefix or n.startswith(prefix.rstrip("/") + "/")]
        if not names:
            raise IncompleteOutput(f"{self.uri}: no files under '{prefix}' in its {MANIFEST}")
        # verified (and fetched) in parallel: a 7B model is a few multi-GB shards, each slow to hash
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            local = list(pool.map(self.local_path, names))
        if U.is_local(self.uri):
            return U.local_path(U.join(self.uri, prefix) if prefix else self.uri)
        strip = len(prefix.rstrip("/")) + 1 if prefix else 0
        return cache.assemble({n[strip:]: path for n, path in zip(names, local)})
