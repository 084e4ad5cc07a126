"""What every `jobs/<stage>.py` entry point shares: logging, scratch folders on the pod's emptyDir, the exit-code
contract (0 done, 64 bad input/config: never retried, anything else: retryable) and a failure record
`<out>/_FAILURE.json` that the controller and `mysproj status` show as the reason (where no kubelet reports the
container's exit code or termination message, the record still does)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import datetime, timezone

from mysproj.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadInput, Preempted, redact
from mysproj.kube.jobspec import FAILURE_RECORD

log = logging.getLogger("mysproj.job")
EXIT_RETRYABLE = 1
# The root filesystem is read-only: these must point into the scratch emptyDir and exist before libraries use them.
SCRATCH_VARS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MYSPROJ_CACHE_DIR", "HF_HOME", "TORCH_EXTENSIONS_DIR",
                "TRITON_CACHE_DIR", "MPLCONFIGDIR")


def prepare_scratch(env=os.environ) -> None:
    if not env.get("MYSPROJ_SCRATCH"):
        return
    for var in SCRATCH_VARS:
        if env.get(var):
            os.makedirs(env[var], exist_ok=True)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _failure_uri() -> str | None:
    out = os.environ.get("MYSPROJ_OUT")
    return f"{out.rstrip('/')}/{FAILURE_RECORD}" if out and _is_rank0() else None


def _clear_record() -> None:
    target = _failure_uri()
    if target:
        from mysproj.storage import uri

        try:
            uri.with_retry(f"removing {target}", lambda: uri.remove(target), budget=10)
        except Exception as e:  # noqa: BLE001 - best effort: a stale record only affects the displayed reason
            log.warning("could not remove %s: %s", target, e)


def _write_record(exit_code: int, error: str) -> None:
    target = _failure_uri()
    if not target:
        return
    from mysproj.storage import uri

    record = {"exit_code": exit_code, "error": error[-2000:], "job": os.environ.get("MYSPROJ_JOB_NAME", ""),
              "node": os.environ.get("MYSPROJ_NODE", ""), "host": socket.gethostname(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        uri.with_retry(f"writing {target}", lambda: uri.write_text(target, json.dumps(record, indent=2)), budget=20)
    except Exception as e:  # noqa: BLE001 - the exit code is what counts; the record only explains it
        log.warning("could not write %s: %s", target, e)


def run_job(stage: str, body: Callable[[], dict]) -> int:
    """Run `body` (env -> config -> library call) and map its outcome to the exit-code contract."""
    from mysproj.cli import setup_logging

    setup_logging()
    prepare_scratch()
    _clear_record()
    try:
        manifest = body() or {}
    except BadInput as e:
        print(f"error: {redact(e)}", file=sys.stderr, flush=True)
        _write_record(EXIT_BAD_INPUT, redact(e))
        return EXIT_BAD_INPUT
    except Preempted as e:  # stopped on SIGTERM at a resumable point: the retried pod resumes
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        _write_record(EXIT_PREEMPTED, f"preempted: {e}")
        return EXIT_PREEMPTED
    except Exception as e:  # noqa: BLE001 - anything unexpected is retryable by the Job
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        _write_record(EXIT_RETRYABLE, redact(f"{type(e).__name__}: {e}"))
        return EXIT_RETRYABLE
    state = "skipped (already complete)" if manifest.get("skipped") else "done"
    log.info("%s: %s -> %s", stage, state, os.environ.get("MYSPROJ_OUT", ""))
    return 0
