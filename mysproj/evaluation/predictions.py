"""An evaluation's per-example rows, written beside its metrics."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq


def write_predictions(out, rows: list[dict], name: str = "predictions.parquet") -> None:
    """`rows` (one dict per example) as a parquet file of the stage output `out`."""

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    out.write_bytes(name, buf.getvalue())
