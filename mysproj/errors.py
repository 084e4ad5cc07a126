"""Error kinds that decide how a stage exits, and so whether Kubernetes retries it; and the redaction every face
applies to what it prints."""

from __future__ import annotations

import errno
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

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left{where} ({e.strerror or e}); free space or raise the quota, then re-run"
    return None


def vanished(e: BaseException) -> str | None:
    """The one line for a file that is gone (deleted or moved while a stage read it: a raw image, a model shard):
    bad input, as no retry brings it back; None for any other error."""
    if not isinstance(e, FileNotFoundError):
        return None
    name = e.filename or _quoted_path(str(e)) or str(e) or "a file"
    return (f"{name}: no such file (deleted or moved while the stage was reading its inputs?); restore it, or "
            f"re-run the stage that writes it, then run this again")


# torch re-raises an exception of a DataLoader worker as the same type holding a multi-line text: this header,
# the worker's whole traceback, and last the original `type: message`.
_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def from_worker(e: BaseException) -> BaseException:
    """`e` as it was raised inside a DataLoader worker (same type, its own message only); any other exception
    as it is. So a missing image is one line naming it, not a page of the worker's traceback."""
    text = str(e)
    if not _WORKER_HEADER.match(text):
        return e
    kind = type(e)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):  # as the traceback module names the type
        name = f"{kind.__module__}.{name}"
    at = text.rfind(f"\n{name}: ")
    if at < 0:
        return e
    try:
        plain = kind(text[at + len(name) + 3:].strip())
    except Exception:  # noqa: BLE001 - a type that takes other arguments: keep torch's text
        return e
    if isinstance(plain, FileNotFoundError):  # a bare OSError text: keep the name for `vanished`
        plain.filename = plain.filename or _quoted_path(str(plain))
    return plain


def _quoted_path(text: str) -> str | None:
    m = re.search(r"No such file or directory: '(.+)'", text)
    return m.group(1) if m else None


def worker_errors(batches):
    """Iterate a DataLoader (or an iterator over one) re-raising its workers' exceptions as `from_worker` makes
    them."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            plain = from_worker(e)
            if plain is e:
                raise
            raise plain from None
        yield batch


class Preempted(Exception):
    """The process was asked to stop (SIGTERM) and stopped cleanly at a point it can resume from."""


class Stopped(BaseException):
    """SIGTERM outside a stage's own handling (`mysproj.process.run`): the work stops where it is. A BaseException,
    as KeyboardInterrupt is: no library's `except Exception` may swallow it and carry on."""


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
