"""Reader of a `prep` output, for every stage that consumes one (eval, finetune, probe).

    data = PreparedData("s3://runs/r1/dtd/prep")
    for s in data.samples("test"):
        img = open_rgb(data.local_image(s))
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from mysproj.data.images import DEFAULT_MAX_PIXELS, open_rgb
from mysproj.storage import cache
from mysproj.storage.manifest import StageInput


@dataclass(frozen=True)
class Sample:
    image: str        # URI of the image object (source dataset, or inside the prep output for textures-mini)
    label: str        # normalised label, an entry of `PreparedData.classes`
    label_id: int     # index into `PreparedData.classes`
    sha256: str
    split: str = ""
    width: int = 0
    height: int = 0


class PreparedData:
    # The decompression-bomb limit prep checked every image against (0: the default); its images pass it again here.
    max_pixels: int = 0

    def __init__(self, uri: str):
        self.input = StageInput(uri, expect_stage="prep")
        self.uri = self.input.uri
        meta = self.input.read_json("classes.json")
        self.classes: list[str] = list(meta["classes"])
        self.task: str = meta["task"]
        self.dataset: str = meta.get("dataset", "")
        self.max_pixels = (self.input.manifest.get("config") or {}).get("max_image_pixels") or 0
        self._table = None

    def _samples_table(self):
        if self._table is None:
            self._table = pq.read_table(self.input.local_path("samples.parquet")).to_pylist()
        return self._table

    def samples(self, split: str) -> list[Sample]:
        return [Sample(r["image"], r["label"], int(r["label_id"]), r["sha256"], r["split"], int(r["width"]),
                       int(r["height"])) for r in self._samples_table() if r["split"] == split]

    def llava_records(self, split: str) -> list[dict]:
        return self.input.read_json(f"llava_{split}.json")

    def report(self) -> dict:
        return self.input.read_json("prep_report.json")

    def local_image(self, sample: Sample) -> str:
        """A local path with the image's bytes, verified against the sha256 prep recorded."""
        return cache.fetch(sample.image, sample.sha256)

    def open_image(self, sample: Sample):
        return open_rgb(self.local_image(sample), max_pixels=self.max_pixels or DEFAULT_MAX_PIXELS)
