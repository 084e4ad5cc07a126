"""Model weights read one file at a time and written one tensor at a time, so converting a 7B checkpoint never holds
the whole model in memory.

Reading: safetensors through `safe_open` (a tensor is read when asked for), torch pickles only with
`torch.load(weights_only=True, mmap=True)` (tensors are file-backed pages, read when touched; a pickle that asks
for anything but tensors and plain containers is refused). Writing: `SafetensorsWriter` writes the header of a
shard planned in advance (names, dtypes, shapes) and then each tensor's bytes as it arrives, so it holds one tensor
at a time. Every failure names the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from contextlib import contextmanager

import torch
from safetensors import safe_open

from mysproj.errors import BadInput
from mysproj.models.integrity import check_weights_file

BIN_PATTERNS = ("pytorch_model*.bin", "model*.bin")
ALIGN = 64
# safetensors' dtype names (the format's specification)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def weight_files(folder: str, what: str) -> list[str]:
    """The folder's safetensors files, else its `pytorch_model*.bin` / `model*.bin` (what `from_pretrained`
    prefers), sorted."""
    st = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if st:
        return st
    bins = sorted({p for pat in BIN_PATTERNS for p in glob.glob(os.path.join(folder, pat))})
    if not bins:
        raise BadInput(f"{what}: no model weights (*.safetensors or pytorch_model*.bin)")
    return bins


class WeightsFile:
    """One opened weights file: `keys()` in stored order, `get(name)` a CPU tensor."""

    def __init__(self, path: str, what: str, handle=None, tensors: dict | None = None):
        self.path, self.what, self._handle, self._tensors = path, what, handle, tensors

    def keys(self) -> list[str]:
        return list(self._tensors if self._tensors is not None else self._handle.keys())

    def get(self, name: str):
        try:
            return self._tensors[name] if self._tensors is not None else self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a damaged file fails here at the earliest
            raise BadInput(f"{self.what}: cannot read tensor {name} ({type(e).__name__}: {_first_line(e)}); "
                           f"download or copy the file again") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


@contextmanager
def open_weights(path: str, what: str | None = None):
    """A `WeightsFile` for a safetensors file or a torch pickle (weights_only; mmap where the file allows it)."""

    what = what or path
    check_weights_file(path, what)
    if path.endswith(".safetensors"):
        try:
            handle = safe_open(path, "pt")
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{what}: not a readable safetensors file ({type(e).__name__}: {_first_line(e)})") \
                from None
        with handle:
            yield WeightsFile(path, what, handle=handle)
        return
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a pre-1.6 (non-zip) pickle
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same bad input
        if type(e).__name__ == "UnpicklingError":  # weights_only refused a global: code, not weights
            found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(e))
            name = next((g for g in found.groups() if g), "") if found else ""
            raise BadInput(f"{what}: refused: its pickle asks for {name or 'more than tensors'}; weights files are "
                           f"read with weights_only (tensors and plain containers only)") from None
        raise BadInput(f"{what}: cannot read torch weights file ({type(e).__name__}: {_first_line(e)}); download "
                       f"or copy it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{what}: not a state dict of tensors")
    opened = WeightsFile(path, what, tensors=state)
    del state
    try:
        yield opened
    finally:
        opened._tensors = {}  # the file's mapping goes with the last tensor a caller still holds, not with this


def specs_of(f: WeightsFile) -> dict:
    """{name: (shape, torch dtype)} without reading tensor data where the format allows."""

    if f._tensors is not None:
        return {k: (tuple(t.shape), t.dtype) for k, t in f._tensors.items()}
    out = {}
    for k in f.keys():
        s = f._handle.get_slice(k)
        out[k] = (tuple(s.get_shape()), getattr(torch, _ST_DTYPES[s.get_dtype()]))
    return out


class SafetensorsWriter:
    """One safetensors file whose tensors (names, dtypes, shapes, in order) are known before any is written; `add`
    them in that order (`aligned_order` puts those of whole 64-byte multiples first). The file is complete once
    `close` returns."""

    def __init__(self, path: str, specs: list[tuple[str, tuple, object]], metadata: dict | None = None):
        names = {str(dt).replace("torch.", ""): st for st, dt in _ST_DTYPES.items()}
        header, offset = {}, 0
        self._order = []
        for name, shape, dtype in specs:
            n = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": names[str(dtype).replace("torch.", "")], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self._order.append((name, tuple(shape), dtype))
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        # The data starts 64-byte aligned (and so does every tensor after tensors of whole 64-byte multiples): an
        # mmap-loaded weight sits as torch's allocator would place it, so kernels take the same code paths.
        raw += b" " * (-(8 + len(raw)) % ALIGN)
        self.path, self._next, self._f = path, 0, open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def add(self, name: str, tensor) -> None:
        want, shape, dtype = self._order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: expected {want} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(dtype=_byte_dtype()).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors not written")
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def aligned_order(specs: dict) -> list[str]:
    """Names of {name: (shape, dtype)} with the tensors whose bytes are whole multiples of `ALIGN` first (each
    then starts aligned), the rest after, each part in its given order."""
    odd = {k for k, (shape, dtype) in specs.items() if _numel(shape) * dtype.itemsize % ALIGN}
    return [k for k in specs if k not in odd] + [k for k in specs if k in odd]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _byte_dtype():
    return torch.uint8
