"""Error kinds that decide how a stage exits, and so whether Kubernetes retries it; and the redaction every face
applies to what it prints."""

from __future__ import annotations

import os
import re

# One fixed exit code for input/config problems: retrying cannot help, so the Job's podFailurePolicy
# (and the pipeline controller) treat it as final. Any other non-zero exit is retryable.
EXIT_BAD_INPUT = 64
# A run stopped on SIGTERM after saving its state (128 + SIGTERM, as a shell reports it): retryable, and the
# retried run resumes from the state it saved.
EXIT_PREEMPTED = 143


class BadInput(Exception):
    """Bad data, config or arguments: the message names the file/field and what to do; never retried."""


class IncompleteOutput(BadInput):
    """A stage output has no valid `_SUCCESS.json` manifest (missing, or its files do not match it)."""


class StorageError(OSError):
    """A storage call that failed for a reason a later retry may fix (the endpoint unreachable past the retry
    budget, a full disk): one line with the cause; the exit is retryable."""


def no_space(e: BaseException) -> str | None:
    """The one line for a write that failed on a full disk or quota (a retry may help once space is freed)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left{where} ({e.strerror or e}); free space or raise the quota, then re-run"
    return None


class Preempted(Exception):
    """The process was asked to stop (SIGTERM) and stopped cleanly at a point it can resume from."""


# `scheme://user:password@host/...`: credentials inside a URI.
URI_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|_KEY$|CREDENTIAL", re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would blank out ordinary words


def has_uri_credentials(text: str) -> bool:
    return bool(URI_CREDENTIALS.search(str(text)))


def redact(text: str, env=None) -> str:
    """`text` with credentials in URIs and the values of secret-looking environment variables replaced by ***.
    Applied where the faces print (errors, tracebacks, log lines), whatever a library put into a message."""
    text = URI_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    env = os.environ if env is None else env
    secrets = sorted((v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN),
                     key=len, reverse=True)
    for value in secrets:
        text = text.replace(value, "***")
    return text
