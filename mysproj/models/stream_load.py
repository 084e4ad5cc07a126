"""Safetensors shards of a model stage output in S3 read straight into memory and onto the device: concurrent ranged
GETs into one host buffer per shard (pinned where the device is a GPU, each part copied on as soon as it is in and
verified), the tensors then cut out of that buffer. No copy of the weights lands on local disk; the small files
(config, tokenizer, processor) go through the verified cache as before."""

from __future__ import annotations

import json
import logging
import threading
import time

import torch

from mysproj.errors import IncompleteOutput
from mysproj.models.weights_io import _ST_DTYPES
from mysproj.storage import s3_transfer
from mysproj.storage.manifest import StageInput

log = logging.getLogger(__name__)


class _Staging:
    """One host buffer reused shard after shard (pinned memory is slow to allocate), grown when a shard is larger."""

    def __init__(self, pinned: bool):
        self.pinned, self.buffer = pinned, None

    def get(self, size: int):
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = None
            self.buffer = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=self.pinned)
        return self.buffer[:size]


def _tensors(raw, what: str, dtype=None) -> dict:
    """Every tensor of a safetensors file whose bytes are `raw` (a uint8 tensor on any device), each in storage of
    its own (a clone: a view would tie every weight to the shard's buffer), cast to `dtype` where floating point."""

    try:
        n = int.from_bytes(bytes(raw[:8].cpu().numpy()), "little")
        header = json.loads(bytes(raw[8:8 + n].cpu().numpy()))
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            a, b = spec["data_offsets"]
            t = raw[8 + n + a:8 + n + b].clone().view(getattr(torch, _ST_DTYPES[spec["dtype"]])).reshape(spec["shape"])
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise IncompleteOutput(f"{what}: not a readable safetensors file ({type(e).__name__}: {e}); re-run the stage "
                               f"that wrote it") from None


def read_state_dict(inp: StageInput, names: list[str], device: str = "cpu", dtype=None) -> tuple[dict, dict]:
    """({tensor name: tensor on `device`}, {"bytes", "seconds"}) of the safetensors files `names` of stage output
    `inp` in S3, each verified against its manifest entry as it streams."""

    on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
    staging = _Staging(pinned=on_gpu)
    state: dict = {}
    total, t0 = 0, time.perf_counter()
    for name in names:
        entry = inp.files[name]
        size = int(entry["size"])
        host = staging.get(size)
        target = torch.empty(size, dtype=torch.uint8, device=device) if on_gpu else host
        lock = threading.Lock()

        def to_device(a: int, b: int, host=host, target=target, lock=lock) -> None:
            if on_gpu and b > a:
                with lock:  # one issuer; the copies still overlap the parts being fetched
                    target[a:b].copy_(host[a:b], non_blocking=True)

        s3_transfer.read_into(inp.path(name), host.numpy(), sha256=entry["sha256"], parts=entry.get("parts"),
                              on_part=to_device)
        if on_gpu:
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused by the next shard
        state.update(_tensors(target, inp.path(name), dtype))
        del target
        total += size
    seconds = time.perf_counter() - t0
    log.info("read %d weights file(s) of %s: %.2f GB in %.1f s (%.2f GB/s to %s)", len(names), inp.uri, total / 1e9,
             seconds, total / 1e9 / max(seconds, 1e-9), device)
    return state, {"bytes": total, "seconds": seconds}
