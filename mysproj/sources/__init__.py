"""Stage-in transports: name a dataset or weights by their public origin (https with a sha256 pin, the Hugging
Face Hub, Kaggle) and fetch, verify and unpack them. Storage-level: no ML imports."""

from mysproj.sources.origin import Origin, download, is_remote, parse, resolve
from mysproj.sources.unpack import unpack

__all__ = ["Origin", "download", "is_remote", "parse", "resolve", "unpack"]
