"""What can be checked of model weights that carry no manifest (a model from outside mysproj, e.g. a downloaded
llava-hf folder), before any of it is loaded: every safetensors file as long as its header says, every shard an
index names present, every zip-format torch file with its end record. A stage output's files are verified by
their manifest's sha256 instead; this is for the rest. No ML imports.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile

from mysproj.errors import BadInput

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"


def check_safetensors(path: str, what: str) -> None:
    """The file is exactly as long as its header describes (8-byte length, JSON header, tensor data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise BadInput(f"{what}: truncated safetensors file ({size} bytes, shorter than its header); "
                           f"download or copy it again")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise BadInput(f"{what}: not a valid safetensors file (unreadable header)") from None
    if size != 8 + n + end:
        state = "truncated" if size < 8 + n + end else "longer than its header describes"
        raise BadInput(f"{what}: {state} ({size} bytes; its header describes {8 + n + end}); download or copy "
                       f"it again")


def check_torch_file(path: str, what: str) -> None:
    """A zip-format torch file (torch.save since 1.6) must end with its central directory; older pickles cannot be
    checked without loading them."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise BadInput(f"{what}: truncated torch file (its zip end record is missing); download or copy it again")


def check_weights_file(path: str, what: str) -> None:
    if path.endswith(".safetensors") or what.endswith(".safetensors"):
        check_safetensors(path, what)
    else:
        check_torch_file(path, what)


def check_index(path: str, what: str) -> None:
    try:
        with open(path) as f:
            shards = set((json.load(f).get("weight_map") or {}).values())
    except (ValueError, AttributeError):
        raise BadInput(f"{what}: {os.path.basename(path)} is not a valid weights index (JSON with weight_map)") \
            from None
    missing = sorted(s for s in shards if not os.path.isfile(os.path.join(os.path.dirname(path), s)))
    if missing:
        raise BadInput(f"{what}: {os.path.basename(path)} names shard(s) that are missing: {', '.join(missing[:3])}"
                       f"{' ...' if len(missing) > 3 else ''}; the folder is incomplete")


def check_model_folder(folder: str, uri: str) -> None:
    """Check every weights file and index below `folder` (a model folder without a manifest); one log line."""
    checked = 0
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(".index.json"):
                check_index(path, uri)
            elif name.endswith(WEIGHT_SUFFIXES):
                check_weights_file(path, f"{uri.rstrip('/')}/{rel}")
                checked += 1
    log.warning("%s has no _SUCCESS.json: used as a model from outside mysproj (%d weights file(s) checked: "
                "complete)", uri, checked)
