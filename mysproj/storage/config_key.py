"""What of a config a stage's output depends on: the config hash in every manifest and the input fields whose
content the manifest records. Reads the field metadata `mysproj.config.fields.opt` writes (`hashed`, `input`); it
lives here, below config, because the manifests (storage) record it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def input_fields(cfg) -> dict[str, Any]:
    """{name: URI or list of URIs} of the fields declared `input=True`."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("input")}


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Hash of the fields that change a stage's result (output locations, operational knobs and input URIs
    excluded: inputs count by their content, `StageOutput.inputs`, so a path spelt another way or a moved run root
    re-runs nothing), and of the config class's RESULT_VERSION where it sets one (raised when the same fields
    come to give other results)."""
    hashed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.metadata.get("hashed", True) and f.name != "out" and not f.metadata.get("input")}
    version = getattr(type(cfg), "RESULT_VERSION", None)
    if version is not None:
        hashed["_result_version"] = version
    blob = json.dumps(hashed, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
