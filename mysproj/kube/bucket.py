"""Can this shell read a run's bucket, and with which settings: the endpoint and region the run's pods use (from the
release's stage Job template) where this shell sets none, then one read. The diagnosis changes nothing in the
process environment; `using` applies the settings to the storage clients of one block (`mysproj status`,
`mysproj reproduce`) and puts the environment back after it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from mysproj.storage.uri import is_local, s3_endpoint, split


@dataclass(frozen=True)
class BucketAccess:
    problem: str = ""                                   # '' when the read worked, else what is missing, in words
    settings: dict[str, str] = field(default_factory=dict)  # what this shell lacks that the run's pods use


def template_env(template: dict | None) -> tuple[dict[str, str], str]:
    """(plain env values, credentials Secret name) of the release's stage Job template."""
    try:
        env = template["spec"]["template"]["spec"]["containers"][0].get("env") or []
    except (KeyError, IndexError, TypeError):
        return {}, ""
    values = {e["name"]: str(e["value"]) for e in env if e.get("value") is not None}
    secret = next((((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name", "") for e in env
                   if e.get("name") == "AWS_ACCESS_KEY_ID"), "")
    return values, secret


def release_settings(template: dict | None, env: Mapping[str, str]) -> dict[str, str]:
    """The release's S3 endpoint and region where `env` sets none: this shell's own choice wins."""
    release_env, _ = template_env(template)
    settings = {}
    if not s3_endpoint(env) and release_env.get("MYSPROJ_S3_ENDPOINT"):
        settings["MYSPROJ_S3_ENDPOINT"] = release_env["MYSPROJ_S3_ENDPOINT"]
    if not (env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")) and release_env.get("AWS_DEFAULT_REGION"):
        settings["AWS_DEFAULT_REGION"] = release_env["AWS_DEFAULT_REGION"]
    return settings


@contextlib.contextmanager
def using(settings: Mapping[str, str]) -> Iterator[None]:
    """Storage clients made inside the block see `settings` (they read the environment); afterwards the
    environment is as it was."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bucket_access(root: str, template: dict | None, env: Mapping[str, str] | None = None) -> BucketAccess:
    """Try one read of `root` the way the run's pods reach it. One attempt: a bucket that does not answer is
    reported, not waited for."""
    env = os.environ if env is None else env
    if is_local(root):
        return BucketAccess()
    settings = release_settings(template, env)
    endpoint = s3_endpoint({**env, **settings}) or "AWS S3"
    try:
        with using(settings):
            fs, path = split(root)
            fs.exists(path)
        return BucketAccess("", settings)
    except Exception as e:  # noqa: BLE001 - whatever stops the read, the table still shows the cluster's view
        return BucketAccess(_why(e, endpoint, template_env(template)[1]), settings)


def _why(e: Exception, endpoint: str, secret: str) -> str:
    kind = type(e).__name__
    if kind == "NoCredentialsError":
        where = f" (the run's pods read them from Secret {secret})" if secret else ""
        return f"no S3 credentials in this shell: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{where}"
    if isinstance(e, PermissionError):
        return f"{endpoint} refused this shell's S3 credentials (access denied)"
    if any(k in kind for k in ("Endpoint", "Connect", "Timeout")) or isinstance(e, (ConnectionError, TimeoutError)):
        return f"{endpoint} is not reachable from here ({kind}); set MYSPROJ_S3_ENDPOINT to an address that is"
    return f"{kind}: {str(e).splitlines()[0][:200] if str(e) else ''}"
