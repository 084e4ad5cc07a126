"""Storage layer: URIs through fsspec, manifests written last, a verified local cache. No ML imports."""

from mysproj.storage.uri import (
                                 exists,
                                 get_file,
                                 is_local,
                                 join,
                                 list_dirs,
                                 list_files,
                                 local_path,
                                 put_file,
                                 read_bytes,
                                 read_text,
                                 remove,
                                 split,
                                 with_retry,
                                 write_bytes,
                                 write_text,
)

__all__ = ["exists", "get_file", "is_local", "join", "list_dirs", "list_files", "local_path", "put_file",
           "read_bytes", "read_text", "remove", "split", "with_retry", "write_bytes", "write_text"]
