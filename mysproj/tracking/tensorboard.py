"""TensorBoard event files inside a stage output, so `tensorboard --logdir <run root>` shows the whole run: one
TensorBoard run per stage output, named by its path below the root (`dtd/ft-projector/seed0/finetune`).

The file is written locally and stored whole through `mysproj.storage` after each batch of points (an atomic rename
locally, one object put on S3), so a reader never meets half a record. Its content is a function of the points
logged so far: a resumed fine-tuning rebuilds it from the points its checkpoint kept and appends from there, and a
re-run first removes the event files an earlier attempt left, so no step appears twice or goes missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping

from mysproj.storage import uri as U

log = logging.getLogger(__name__)
PREFIX = "events.out.tfevents."


def event_files(out_uri: str) -> list[str]:
    """Names of the event files directly in `out_uri` (not in its sub-folders: checkpoints, models)."""
    return [n for n in U.list_files(out_uri) if "/" not in n and n.startswith(PREFIX)]


class EventLog:
    """Scalar points of one stage output; `points` are earlier ones to keep: (step, wall time, {tag: value})."""

    def __init__(self, out_uri: str, points: Iterable[tuple[int, float, Mapping[str, float]]] = ()):
        from tensorboard.compat.proto import event_pb2  # noqa: PLC0415 - not in the CPU image: only the torch stages write event files
        from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: PLC0415 - not in the CPU image: only the torch stages write event files

        self._event_pb2 = event_pb2
        self.uri = out_uri
        for stale in event_files(out_uri):
            U.remove(U.join(out_uri, stale))
        # The name holds the start time, as TensorBoard's writers do: a later attempt's file sorts after.
        self.name = f"{PREFIX}{int(time.time()):010d}.mysproj"
        self._dir = tempfile.mkdtemp(prefix="mysproj-tb-")
        self.local = os.path.join(self._dir, self.name)
        self._file = open(self.local, "wb")  # noqa: SIM115 - open for the life of the log, closed in close()
        self._writer = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.points = 0
        for step, wall, values in points:
            self.scalars(step, values, wall)

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def scalars(self, step: int, values: Mapping[str, float | None], wall_time: float | None = None) -> None:
        """One point per tag at `step` (None values are left out)."""
        from tensorboard.compat.proto import summary_pb2  # noqa: PLC0415 - not in the CPU image: only the torch stages write event files

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items() if v is not None])
        self._write(self._event_pb2.Event(wall_time=wall_time or time.time(), step=int(step), summary=summary))
        self.points += 1

    def flush(self) -> None:
        """Store the file as it is now (whole)."""
        self._file.flush()
        U.put_file(self.local, U.join(self.uri, self.name))

    def close(self, out=None) -> str:
        """Store the file a last time: through `out` (a `StageOutput`) to list it in the manifest, else directly.
        Returns its name."""
        self._file.close()
        if out is not None:
            out.put_file(self.local, self.name)
        else:
            U.put_file(self.local, U.join(self.uri, self.name))

        shutil.rmtree(self._dir, ignore_errors=True)
        return self.name


def write_scalars(out, values: Mapping[str, float | None], step: int = 0) -> str:
    """A stage's final numbers (an evaluation's F1) as one event file in its output `out` (a `StageOutput`)."""
    events = EventLog(out.uri)
    events.scalars(step, values)
    return events.close(out)

