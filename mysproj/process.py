"""How every mysproj process starts and ends: the CLI (`mysproj ...`), a stage's Job (`jobs/stage.py`), the
controller's Job (`jobs/controller.py`) and the local runner's stage processes all run their work through `run`,
so the same failure gives the same exit code, the same one line and the same record whichever face ran it.

Exit codes: 0 done; 64 bad input, bad config or a deployment problem (an image without a module, a write to a
read-only root): retrying cannot help, never retried; 130 interrupted (Ctrl-C); 143 stopped on SIGTERM (a pod
deleted, a node drained; fine-tuning at a point it resumes from), retryable; 1 anything else, retryable. Every
line printed is redacted (`mysproj.errors.redact`). Where the process has an output (`MYSPROJ_OUT`, set on a
stage's Job) rank 0 keeps `<out>/_FAILURE.json`, the reason the controller and `mysproj status` show: removed when
an attempt starts, written when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from mysproj.errors import (
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    BadInput,
    Preempted,
    Stopped,
    StorageError,
    no_space,
    redact,
    vanished,
)
from mysproj.storage import uri

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_INTERRUPTED = 130
FAILURE_RECORD = "_FAILURE.json"  # next to a stage's output when its Job fails
# The root filesystem is read-only in the images: these must point into the scratch emptyDir and exist before
# libraries use them.
SCRATCH_VARS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MYSPROJ_CACHE_DIR", "HF_HOME", "TORCH_EXTENSIONS_DIR",
                "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR")
NOISY_LOGGERS = ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "httpx", "matplotlib")
log = logging.getLogger("mysproj.process")


class _RedactingFormatter(logging.Formatter):
    def format(self, record):
        return redact(super().format(record))


def _print_redacted_traceback(kind, value, tb) -> None:
    print(redact("".join(traceback.format_exception(kind, value, tb))), file=sys.stderr, end="", flush=True)


def setup_logging() -> None:
    """Log lines, and the traceback of an exception nobody caught, printed with secrets redacted: whatever a
    library put into a message (botocore echoes URIs and bucket names) never shows a credential."""
    sys.excepthook = _print_redacted_traceback
    raw = os.environ.get("MYSPROJ_LOG_LEVEL", "INFO")
    level = raw.strip().upper() or "INFO"
    known = level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    logging.basicConfig(level=level if known else "INFO", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not known:  # a junk value must not stop every command, --help included
        logging.getLogger("mysproj").warning("MYSPROJ_LOG_LEVEL=%r is not a log level (DEBUG, INFO, WARNING, ERROR, "
                                             "CRITICAL); using INFO", raw)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_scratch(env=os.environ) -> None:
    if not env.get("MYSPROJ_SCRATCH"):
        return
    for var in SCRATCH_VARS:
        if env.get(var):
            os.makedirs(env[var], exist_ok=True)


def deployment_problem(what: str, e: BaseException) -> str | None:
    """The one line for a failure no retry can fix (bad input, a file gone while the stage ran, an image without a
    module the stage needs, a write to the read-only root file system), or None for a failure worth retrying."""
    if isinstance(e, BadInput):
        return str(e)
    if vanished(e):
        return vanished(e)
    if isinstance(e, ModuleNotFoundError):
        return (f"stage {what}: this image lacks the Python module {e.name!r} ({e}); run the stage in an image that "
                "has it (the chart's images.gpu for every stage that needs torch)")
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return (f"stage {what}: {e.filename or 'a path'} is on the read-only root file system; point HOME, TMPDIR "
                "and the cache variables below a writable volume (the chart's stages.scratchDir)")
    return None


def outcome(what: str, e: BaseException) -> tuple[int, str]:
    """(exit code, the line printed) for a failure; a line without `error:`/`stopped:` is a traceback."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "stopped: interrupted"
    if isinstance(e, (Preempted, Stopped)):  # SIGTERM: the retried process resumes or starts again
        return EXIT_PREEMPTED, f"stopped: {redact(e)}"
    line = str(e) if isinstance(e, StorageError) else no_space(e)
    if line is not None:  # retryable (the endpoint back, space freed), and its cause fits one line
        return EXIT_RETRYABLE, f"error: {redact(line)}"
    problem = deployment_problem(what, e)
    if problem is not None:
        return EXIT_BAD_INPUT, f"error: {redact(problem)}"
    return EXIT_RETRYABLE, redact("".join(traceback.format_exception(type(e), e, e.__traceback__))).rstrip("\n")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def failure_record_uri() -> str | None:
    out = os.environ.get("MYSPROJ_OUT")
    return f"{out.rstrip('/')}/{FAILURE_RECORD}" if out and _is_rank0() else None


def clear_record() -> None:
    target = failure_record_uri()
    if target:
        try:
            uri.with_retry(f"removing {target}", lambda: uri.remove(target), budget=10)
        except Exception as e:  # noqa: BLE001 - best effort: a stale record only affects the displayed reason
            log.warning("could not remove %s: %s", target, e)


def write_record(exit_code: int, error: str) -> None:
    target = failure_record_uri()
    if not target:
        return
    record = {"exit_code": exit_code, "error": error[-2000:], "job": os.environ.get("MYSPROJ_JOB_NAME", ""),
              "node": os.environ.get("MYSPROJ_NODE", ""), "host": socket.gethostname(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        uri.with_retry(f"writing {target}", lambda: uri.write_text(target, json.dumps(record, indent=2)), budget=20)
    except Exception as e:  # noqa: BLE001 - the exit code is what counts; the record only explains it
        log.warning("could not write %s: %s", target, e)


@contextlib.contextmanager
def stop_on_sigterm(what: str) -> Iterator[None]:
    """While active, SIGTERM raises `Stopped` where nothing else handles it. A container's first process is its
    PID namespace's init, to which the kernel delivers no signal it has no handler for: without one a deleted pod's
    stage went on for the whole grace period and was killed then, or finished as if nothing had been asked."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Stopped(f"SIGTERM received (a pod deleted or a node drained); {what} stopped where it was, and runs "
                      "again from its start or last checkpoint when retried")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(what: str, body: Callable[[], int | None]) -> int:
    """Run `body` (the command or stage; `what` names it in messages) under the contract above; its return value
    (None = 0) is the exit code when it returns."""
    clear_record()
    try:
        with stop_on_sigterm(what):
            prepare_scratch()
            return int(body() or 0)
    except (Exception, KeyboardInterrupt, Stopped) as e:  # noqa: BLE001 - every failure maps to one exit code
        code, line = outcome(what, e)
        print(line, file=sys.stderr, flush=True)
        if isinstance(e, Stopped):
            write_record(code, f"stopped: {redact(e)}")
        elif code == EXIT_PREEMPTED:
            write_record(code, f"preempted: {redact(e)}")
        elif line.startswith("error: "):
            write_record(code, line.removeprefix("error: "))
        elif code != EXIT_INTERRUPTED:
            write_record(code, redact(f"{type(e).__name__}: {e}"))
        return code


def run_stage(stage: str, body: Callable[[], dict]) -> int:
    """A stage's process (its Job, or a child of the local runner): logging set up, then `body` (config ->
    library call, returning the manifest) under the contract above."""
    setup_logging()

    def stage_body() -> int:
        manifest = body() or {}
        state = "skipped (already complete)" if manifest.get("skipped") else "done"
        logging.getLogger("mysproj.job").info("%s: %s -> %s", stage, state, os.environ.get("MYSPROJ_OUT", ""))
        return EXIT_OK

    return run(stage, stage_body)
