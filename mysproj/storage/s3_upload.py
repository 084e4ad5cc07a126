"""A local file written to S3 as a concurrent multipart upload, each part read, hashed and sent by its own
worker, so the part digests a manifest records (`mysproj.storage.s3_transfer`) cost no extra pass over the file.
The object appears only when the upload completes; a failed upload is aborted, leaving nothing behind."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

from mysproj.storage import uri as U
from mysproj.storage.s3_transfer import TransferSettings, bucket_key, client, part_digests, part_ranges
from mysproj.storage.stage_time import transfer

MIN_PART = 5 * 1024**2  # S3's smallest multipart part (all but the last)


def _read(fd: int, start: int, end: int) -> bytes:
    data = os.pread(fd, end - start, start)
    if len(data) != end - start:
        raise OSError(f"the file shrank while it was uploaded ({len(data)} of {end - start} bytes at {start})")
    return data


def upload(local: str, uri: str, settings: TransferSettings | None = None) -> dict | None:
    """Store `local` at `uri`; returns the part digests (`{"bytes": part size, "sha256": [...]}`) of a file of
    more than one part, else None. An upload part is a whole number of digest parts (at least S3's 5 MiB)."""
    settings = settings or TransferSettings.from_env()
    part = settings.part_bytes
    per_upload = max(1, -(-MIN_PART // part)) * part
    bucket, key = bucket_key(uri)
    s3 = client(settings.connections)
    size = os.path.getsize(local)
    ranges = part_ranges(size, per_upload)
    recorded = len(part_ranges(size, part)) > 1
    with transfer("out"), open(local, "rb") as f:
        fd = f.fileno()
        if len(ranges) == 1:
            data = _read(fd, 0, size)
            U.with_retry(f"uploading {local} to {uri}", lambda: s3.put_object(Bucket=bucket, Key=key, Body=data))
            return {"bytes": part, "sha256": part_digests(data, part)} if recorded else None
        upload_id = U.with_retry(f"starting the upload of {uri}",
                                 lambda: s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]

        def one(i: int) -> tuple[list[str], str]:
            data = _read(fd, *ranges[i])
            sent = U.with_retry(f"uploading part {i + 1} of {uri}", lambda: s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=data))
            return part_digests(data, part), sent["ETag"]

        try:
            with ThreadPoolExecutor(max_workers=min(settings.connections, len(ranges)),
                                    thread_name_prefix="s3-put") as pool:
                done = list(pool.map(one, range(len(ranges))))
            U.with_retry(f"completing the upload of {uri}", lambda: s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": etag} for i, (_, etag) in enumerate(done)]}))
        except BaseException:
            with contextlib.suppress(Exception):  # the upload's own error is the one to report
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
    return {"bytes": part, "sha256": [sha for shas, _ in done for sha in shas]}
