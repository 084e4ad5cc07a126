"""One record per dataset: the layout reader that scans it, the task phrase of its prompt, where it comes from and
the terms it is published under. The config layer, prep, the DAG and the chart's checks all read these records,
so a dataset is added here (plus its reader module). No ML imports: the controller reads this too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    name: str
    reader: str                       # module with `scan(cfg, out) -> Listing` (mysproj.data.datasets)
    task: str                         # the task phrase in "...relating to <task>:" (paper §2; docs/recipe.md)
    origin: tuple[str, ...] = ()      # default source: origin URIs unpacked into one folder (docs/stage-in.md)
    terms: str = ""                   # a page whose terms the user must accept before it is fetched
    licence: str = ""


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
            licence="research use (the DTD page)"),
    Dataset("plantdoc", "mysproj.data.datasets.plantdoc", "plant leaf diseases", (PLANTDOC_ORIGIN,),
            licence="CC BY 4.0"),
    Dataset("dermnet", "mysproj.data.datasets.dermnet", "skin diseases", (DERMNET_ORIGIN,),
            licence="as published on Kaggle (a Kaggle account and token are needed)"),
    Dataset("crisismmd", "mysproj.data.datasets.crisismmd", "humanitarian categories of disaster images",
            CRISISMMD_ORIGIN, terms=CRISISMMD_TERMS, licence="research use on the terms of its page"),
    Dataset("imagefolder", "mysproj.data.datasets.imagefolder", "the image's category"),
    Dataset("textures-mini", "mysproj.data.datasets.textures_mini", "textures"),
)}
DATASETS = tuple(RECORDS)
# Embedded in the package: no source, nothing to fetch.
EMBEDDED = ("textures-mini",)
