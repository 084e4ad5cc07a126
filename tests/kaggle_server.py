"""Kaggle's API on 127.0.0.1, just the calls Kaggle's client makes to download a dataset version: GetDataset
(the current version) and DownloadDataset (a redirect to a signed storage URL whose response carries the md5 in
x-goog-hash, as Google Cloud Storage sends it). Kaggle's client has fixed endpoints; its `LOCALHOST` one
(`http://localhost`) reaches this server through HTTP_PROXY, which the client honours.

    server = start_kaggle(monkeypatch)            # sets KAGGLE_API_ENVIRONMENT, HTTP_PROXY, KAGGLE_USERNAME/KEY
    server.add_dataset("shubhamgoel27", "dermnet", 1, zip_bytes)
    server.origin                                 # the HttpOrigin underneath: faults, bytes served, requests
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

from http_origin import HttpOrigin

API = "/api/v1/datasets.DatasetApiService/"


@dataclass
class KaggleServer:
    origin: HttpOrigin
    username: str = "kaggle-test-user"
    key: str = "kaggle-test-key-0123456789"
    token: str = "KGAT_test_token_0123456789"
    datasets: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)  # -> {version: file name}

    def add_dataset(self, owner: str, name: str, version: int, zip_bytes: bytes) -> str:
        """Publish `zip_bytes` as version `version`; returns the storage file's name on the origin."""
        path = f"storage/{owner}/{name}/{version}/{name}.zip"
        md5 = base64.b64encode(hashlib.md5(zip_bytes).digest()).decode()
        self.origin.add(path, zip_bytes, headers={"x-goog-hash": f"crc32c=AAAAAA==,md5={md5}"})
        self.datasets.setdefault((owner, name), {})[version] = path
        return path

    def stop(self) -> None:
        self.origin.stop()

    # ------------------------------------------------------------------------------------------ handlers

    def _authorised(self, handler) -> bool:
        auth = handler.headers.get("Authorization") or ""
        basic = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        if auth in (f"Basic {basic}", f"Bearer {self.token}"):
            return True
        handler.send_simple(401, json.dumps({"code": 401, "message": "Unauthenticated"}).encode(), "application/json")
        return False

    def _find(self, handler, body: bytes):
        req = json.loads(body or b"{}")
        versions = self.datasets.get((req.get("ownerSlug"), req.get("datasetSlug")))
        if not versions or (req.get("datasetVersionNumber") and req["datasetVersionNumber"] not in versions):
            handler.send_simple(404, json.dumps({"code": 404, "message": "Not found"}).encode(), "application/json")
            return None, None
        return req, versions

    def get_dataset(self, handler, path: str, body: bytes) -> bool:
        if self._authorised(handler):
            req, versions = self._find(handler, body)
            if req is not None:
                handler.send_simple(200, json.dumps({"ref": f"{req['ownerSlug']}/{req['datasetSlug']}",
                                                     "currentVersionNumber": max(versions)}).encode(),
                                    "application/json")
        return True

    def download_dataset(self, handler, path: str, body: bytes) -> bool:
        if self._authorised(handler):
            req, versions = self._find(handler, body)
            if req is not None:
                file = versions[req.get("datasetVersionNumber") or max(versions)]
                handler.send_simple(302, b"", headers={
                    "Location": f"{self.origin.url(file)}?X-Goog-Signature=signed-{len(self.origin.requests)}"})
        return True


def start_kaggle(monkeypatch) -> KaggleServer:
    origin = HttpOrigin()
    server = KaggleServer(origin)
    origin.routes += [("POST", API + "GetDataset", server.get_dataset),
                      ("POST", API + "DownloadDataset", server.download_dataset)]
    origin.start()
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, origin.endpoint)
    for name in ("NO_PROXY", "no_proxy", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", server.username)
    monkeypatch.setenv("KAGGLE_KEY", server.key)
    return server
