"""The chart's `pipeline.overrides` schema, generated from the stage dataclasses (the single source of field names),
so a misspelled override fails `helm install` instead of failing a stage hours later.

    python -m mysproj.kube.values_schema charts/mysproj/values.schema.json   # rewrite that part in place
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing

from mysproj.config.datasets import RECORDS
from mysproj.config.fields import _unwrap_optional
from mysproj.stages.registry import STAGES


def _json_type(tp) -> str | list[str]:
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    name = {int: "integer", float: "number", bool: "boolean", str: "string"}.get(base)
    name = name or ("array" if origin in (list, tuple) else "object")
    return [name, "null"] if optional else name


def stage_overrides_schema() -> dict:
    stages = {}
    for stage, record in STAGES.items():
        cls = record.config
        hints = typing.get_type_hints(cls)
        props = {}
        for f in dataclasses.fields(cls):
            if f.name == "out":  # the controller places every output below the run root
                continue
            prop: dict = {"type": _json_type(hints[f.name])}
            if f.metadata.get("choices"):
                prop["enum"] = list(f.metadata["choices"]) + ([None] if isinstance(prop["type"], list) else [])
            base, _ = _unwrap_optional(hints[f.name])
            if typing.get_origin(base) in (list, tuple):
                prop["items"] = {"type": _json_type((typing.get_args(base) or (str,))[0])}
            props[f.name] = prop
        stages[stage] = {"type": "object", "additionalProperties": False, "properties": props}
    return {"type": "object", "additionalProperties": False, "properties": stages}


def dataset_names() -> list[str]:
    """The datasets the chart accepts in `pipeline.datasets` and `pipeline.accept_terms`: one per record."""
    return list(RECORDS)


def update(path: str) -> None:
    """Write the parts of the chart's schema that come from the registries: stage overrides and dataset names."""
    with open(path) as f:
        schema = json.load(f)
    pipeline = schema["properties"]["pipeline"]["properties"]
    pipeline["overrides"] = stage_overrides_schema()
    for name in ("datasets", "accept_terms"):
        pipeline[name]["items"]["enum"] = dataset_names()
    with open(path, "w") as f:
        json.dump(schema, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    update(sys.argv[1])
