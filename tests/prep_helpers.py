"""Run the prep stage in-process on a layout and read its outputs back."""

from __future__ import annotations

import csv
import io
import json
import os

import pyarrow.parquet as pq

from mysproj.config.fields import load_config
from mysproj.config.stages import PrepConfig
from mysproj.stages import prep


def run_prep(out: str, **fields) -> dict:
    fields.setdefault("workers", 1)
    cfg = load_config(PrepConfig, overrides={"out": str(out), **fields}, env={})
    return prep.run(cfg)


def read_outputs(out: str) -> dict:
    out = str(out)

    def text(name):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return f.read()

    return {
        "samples": pq.read_table(os.path.join(out, "samples.parquet")).to_pylist(),
        "train_csv": list(csv.reader(io.StringIO(text("train.csv")))),
        "test_csv": list(csv.reader(io.StringIO(text("test.csv")))),
        "llava_train": json.loads(text("llava_train.json")),
        "llava_test": json.loads(text("llava_test.json")),
        "classes": json.loads(text("classes.json")),
        "report": json.loads(text("prep_report.json")),
        "manifest": json.loads(text("_SUCCESS.json")),
    }


def skipped_reasons(report: dict) -> dict[str, str]:
    """basename of each skipped file -> reason."""
    return {os.path.basename(s["image"]): s["reason"] for s in report["skipped"]}
