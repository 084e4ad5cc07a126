"""Kaggle dataset origins (`kaggle://OWNER/DATASET[/versions/N]`) through Kaggle's own client library
(kagglesdk, the API client the `kaggle` CLI is built on; the CLI package itself signs in when imported). The
client asks Kaggle for the version's download, which redirects to a signed storage URL; that URL goes through the
ranged, resumable engine and the file is checked against the md5 the storage sends (x-goog-hash).

Credentials: KAGGLE_API_TOKEN, or KAGGLE_USERNAME + KAGGLE_KEY, from `env`; never logged.
KAGGLE_API_ENVIRONMENT picks Kaggle's endpoint the way Kaggle's client does (LOCALHOST for tests)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping

from mysproj.errors import BadInput, redact
from mysproj.sources import http, verify
from mysproj.storage import uri as storage

log = logging.getLogger(__name__)

_CREDENTIALS = "set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY (the chart's kaggle Secret)"
_ENVS = {"PROD": "PROD", "LOCALHOST": "LOCAL", "STAGING": "STAGING", "ADMIN": "ADMIN", "QA": "QA", "TEST": "TEST"}


def _client(origin, env: Mapping[str, str]):
    from kagglesdk import KaggleClient  # noqa: PLC0415 - only fetches from Kaggle
    from kagglesdk.kaggle_env import KaggleEnv  # noqa: PLC0415 - only fetches from Kaggle

    token = env.get("KAGGLE_API_TOKEN") or None
    user, key = env.get("KAGGLE_USERNAME") or None, env.get("KAGGLE_KEY") or None
    if token and os.path.isfile(token):  # Kaggle's clients accept a file holding the token, too
        with open(token) as f:
            token = f.read().strip() or None
    if not token and not (user and key):
        raise BadInput(f"{origin.uri}: no Kaggle credentials; {_CREDENTIALS}")
    which = env.get("KAGGLE_API_ENVIRONMENT") or "PROD"
    if which not in _ENVS:
        raise BadInput(f"KAGGLE_API_ENVIRONMENT={which!r}: expected one of {', '.join(_ENVS)}")
    return KaggleClient(env=KaggleEnv[_ENVS[which]], username=None if token else user,
                        password=None if token else key, api_token=token, user_agent="mysproj")


def _call(origin, what: str, fn, retry_seconds: float | None):
    """A Kaggle API call: refusals become `BadInput`, 5xx and connection failures are retried."""
    import requests  # noqa: PLC0415 - only fetches over https

    budget = http.RETRY_SECONDS if retry_seconds is None else retry_seconds
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return fn()
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else None
            if code in (401, 403):
                raise BadInput(f"{origin.uri}: Kaggle refused {what} ({code}); check the credentials ({_CREDENTIALS}) "
                               f"and accept the dataset's rules on its page if it has any") from None
            if code == 404:
                raise BadInput(f"{origin.uri}: Kaggle has no dataset {origin.repo}"
                               f"{f' version {origin.revision}' if origin.revision else ''}; check the name") from None
            if code is None or not (code >= 500 or code == 429) or time.monotonic() + delay > deadline:
                raise BadInput(f"{origin.uri}: {what} failed ({redact(str(e)).splitlines()[0]})") from None
            err = f"HTTP {code}"
        except (requests.ConnectionError, requests.Timeout) as e:
            if time.monotonic() + delay > deadline:
                raise BadInput(f"{origin.uri}: {what} kept failing ({type(e).__name__}); retry later") from None
            err = type(e).__name__
        log.warning("%s: %s: %s; retrying in %.1fs", origin.uri, what, err, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def current_version(origin, *, env: Mapping[str, str] = os.environ, retry_seconds: float | None = None) -> str:
    """The dataset's current version number, as a string."""
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest  # noqa: PLC0415 - only fetches from Kaggle

    owner, slug = origin.repo.split("/")

    def ask():
        with _client(origin, env) as k:
            req = ApiGetDatasetRequest()
            req.owner_slug, req.dataset_slug = owner, slug
            return k.datasets.dataset_api_client.get_dataset(req)

    version = _call(origin, "looking up the current version", ask, retry_seconds).current_version_number
    if not version:
        raise BadInput(f"{origin.uri}: Kaggle gave no current version; name one (kaggle://{origin.repo}/versions/N)")
    return str(version)


def _md5(headers) -> str | None:
    for part in (headers.get("x-goog-hash") or "").split(","):
        algo, _, value = part.strip().partition("=")
        if algo == "md5" and value:
            return value
    return None


def download(origin, dest: str, *, parts_uri: str | None, env: Mapping[str, str] = os.environ,
             log: logging.Logger = log, **engine) -> dict:
    """The dataset version's zip into `dest/<dataset>.zip`, verified by the md5 the storage reports."""
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest  # noqa: PLC0415 - only fetches from Kaggle

    t0 = time.monotonic()
    retry = engine.get("retry_seconds")
    version = origin.revision or current_version(origin, env=env, retry_seconds=retry)
    owner, slug = origin.repo.split("/")
    name = f"{slug}.zip"

    def ask():
        with _client(origin, env) as k:
            req = ApiDownloadDatasetRequest()
            req.owner_slug, req.dataset_slug, req.dataset_version_number = owner, slug, int(version)
            resp = k.datasets.dataset_api_client.download_dataset(req)
            resp.close()  # only where it redirects to, and the digest, are needed: the engine fetches the bytes
            return resp

    resp = _call(origin, "the download", ask, retry)
    md5 = _md5(resp.headers)
    if not resp.history:
        raise BadInput(f"{origin.uri}: Kaggle answered the download without a redirect to the file; this client "
                       f"expects a signed storage URL")
    eng = http.Engine(resp.url, what=f"{origin.uri} (version {version})", log=log, **engine)
    parts = storage.join(parts_uri, hashlib.sha256(version.encode()).hexdigest()[:8]) if parts_uri else None
    out = eng.fetch(dest, name, parts_uri=parts, expect={"md5": md5} if md5 else None)
    return verify.record(origin, version, {name: out}, time.monotonic() - t0,
                       "kaggle md5" if md5 else "none (Kaggle sent no md5; sha256 recorded)")
