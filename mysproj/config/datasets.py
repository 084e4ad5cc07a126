"""One record per dataset: the layout reader that scans it, the task phrase of its prompt, the paper's task whose
published numbers the report shows beside it, its real shape (the benchmark's fixture, the planner's sizes), where
it comes from and the terms it is published under. The config layer, prep, the DAG, the report, the benchmark and
the chart's checks all read these records, so a dataset is added here (plus its reader module;
docs/extending.md). No ML imports: the controller reads this too."""

from __future__ import annotations

from dataclasses import dataclass

from mysproj.config import dataset_shapes as shapes
from mysproj.config.dataset_shapes import Shape


@dataclass(frozen=True)
class Dataset:
    name: str
    reader: str                       # module with `scan(cfg, out) -> Listing` (mysproj.data.datasets)
    task: str                         # the task phrase in "...relating to <task>:" (paper §2; docs/recipe.md)
    origin: tuple[str, ...] = ()      # default source: origin URIs unpacked into one folder (docs/stage-in.md)
    terms: str = ""                   # a page whose terms the user must accept before it is fetched
    licence: str = ""
    paper_task: str | None = None     # the paper's task (mysproj.report.paper.TASKS) whose numbers it is shown beside
    fixture: Shape | None = None      # its real size and layout (mysproj.config.dataset_shapes)
    embedded: bool = False            # shipped inside the package: no source, nothing to fetch


DTD_ORIGIN = ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
              "#sha256=e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205")
# GitHub's archive bytes are not stable; github:// verifies each extracted file against the commit's tree instead.
PLANTDOC_ORIGIN = "github://pratikkayal/PlantDoc-Dataset@5467f6012d78d1c446145d5f582da6096f852ae8"
DERMNET_ORIGIN = "kaggle://shubhamgoel27/dermnet/versions/1"
CRISISMMD_ORIGIN = ("https://crisisnlp.qcri.org/data/crisismmd/CrisisMMD_v2.0.tar.gz",
                    # the split files belong next to data_image/, inside the tarball's top folder
                    "https://crisisnlp.qcri.org/data/crisismmd/crisismmd_datasplit_all.zip#into=CrisisMMD_v2.0")
CRISISMMD_TERMS = "https://crisisnlp.qcri.org/crisismmd"

RECORDS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("dtd", "mysproj.data.datasets.dtd", "textures", (DTD_ORIGIN,),
            licence="research use (the DTD page)", paper_task="Textures", fixture=shapes.DTD),
    Dataset("plantdoc", "mysproj.data.datasets.plantdoc", "plant leaf diseases", (PLANTDOC_ORIGIN,),
            licence="CC BY 4.0", paper_task="Agriculture", fixture=shapes.PLANTDOC),
    Dataset("dermnet", "mysproj.data.datasets.dermnet", "skin diseases", (DERMNET_ORIGIN,),
            licence="as published on Kaggle (a Kaggle account and token are needed)", paper_task="Dermatology",
            fixture=shapes.DERMNET),
    Dataset("crisismmd", "mysproj.data.datasets.crisismmd", "humanitarian categories of disaster images",
            CRISISMMD_ORIGIN, terms=CRISISMMD_TERMS, licence="research use on the terms of its page",
            paper_task="Humanitarian", fixture=shapes.CRISISMMD),
    Dataset("imagefolder", "mysproj.data.datasets.imagefolder", "the image's category"),
    # the synthetic stand-in for DTD: the paper's Textures numbers are shown beside it for orientation only
    Dataset("textures-mini", "mysproj.data.datasets.textures_mini", "textures", paper_task="Textures",
            embedded=True),
)}


def register(record: Dataset) -> None:
    """Add a dataset (an extension, or a test's toy dataset); `unregister` takes it out again. Every reader of
    the records (prep's `dataset` choices included) sees it at once: they read `RECORDS`, never a copy."""
    if record.name in RECORDS:
        raise ValueError(f"dataset {record.name!r} is registered already")
    RECORDS[record.name] = record


def unregister(name: str) -> None:
    RECORDS.pop(name, None)
