"""The Kubernetes Job entry point of every stage, `python -u jobs/stage.py <stage>`: MYSPROJ_* env -> the stage's
config -> the same library call the CLI makes. It owns logging, scratch folders on the pod's emptyDir, the
exit-code contract (0 done, 64 bad input/config: never retried, anything else: retryable) and a failure record
`<out>/_FAILURE.json` that the controller and `mysproj status` show as the reason (where no kubelet reports the
container's exit code or termination message, the record still does).

Fine-tuning is launched explicitly (the chart sets the env; the command stays `jobs/stage.py finetune`):
- 1 GPU per pod, 1 node: the stage runs in this process.
- N GPUs per pod (MYSPROJ_NPROC_PER_NODE=N) and/or M nodes (NNODES=M, one Job per node rank, NODE_RANK, and
  MASTER_ADDR = rank 0's name under the chart's headless Service): the entry point re-executes itself under
      torchrun --nnodes M --node-rank R --nproc-per-node N --master-addr MASTER_ADDR --master-port MASTER_PORT
  after waiting (up to MYSPROJ_DNS_WAIT_SECONDS) for MASTER_ADDR to resolve: rank 0's DNS record appears only once
  its pod exists, which may be after the other ranks start. Each torchrun worker then runs the stage (LOCAL_RANK set).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone

from mysproj.config import load_config
from mysproj.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadInput, Preempted, StorageError, no_space, redact, vanished
from mysproj.kube.jobspec import FAILURE_RECORD
from mysproj.stages import registry

log = logging.getLogger("mysproj.job")
EXIT_RETRYABLE = 1
# The root filesystem is read-only: these must point into the scratch emptyDir and exist before libraries use them.
SCRATCH_VARS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MYSPROJ_CACHE_DIR", "HF_HOME", "TORCH_EXTENSIONS_DIR",
                "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR")


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


def deployment_problem(stage: str, e: Exception) -> str | None:
    """The one line for a failure no retry can fix (bad input, a file gone while the stage ran, an image without a
    module the stage needs, a write to the read-only root file system), or None for a failure worth retrying."""
    if isinstance(e, BadInput):
        return str(e)
    if vanished(e):
        return vanished(e)
    if isinstance(e, ModuleNotFoundError):
        return (f"stage {stage}: this image lacks the Python module {e.name!r} ({e}); run the stage in an image that "
                "has it (the chart's images.gpu for every stage that needs torch)")
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return (f"stage {stage}: {e.filename or 'a path'} is on the read-only root file system; point HOME, TMPDIR "
                "and the cache variables below a writable volume (the chart's stages.scratchDir)")
    return None


def run_job(stage: str, body: Callable[[], dict]) -> int:
    """Run `body` (env -> config -> library call) and map its outcome to the exit-code contract."""
    from mysproj.cli import setup_logging

    setup_logging()
    _clear_record()
    try:
        prepare_scratch()
        manifest = body() or {}
    except Preempted as e:  # stopped on SIGTERM at a resumable point: the retried pod resumes
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        _write_record(EXIT_PREEMPTED, f"preempted: {e}")
        return EXIT_PREEMPTED
    except OSError as e:
        line = str(e) if isinstance(e, StorageError) else no_space(e)
        if line is None:
            return _unexpected(stage, e)
        print(f"error: {redact(line)}", file=sys.stderr, flush=True)  # retryable, and its cause fits one line
        _write_record(EXIT_RETRYABLE, redact(line))
        return EXIT_RETRYABLE
    except Exception as e:  # noqa: BLE001 - anything unexpected is retryable by the Job
        return _unexpected(stage, e)
    state = "skipped (already complete)" if manifest.get("skipped") else "done"
    log.info("%s: %s -> %s", stage, state, os.environ.get("MYSPROJ_OUT", ""))
    return 0


def _unexpected(stage: str, e: Exception) -> int:
    problem = deployment_problem(stage, e)
    if problem is None:
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        _write_record(EXIT_RETRYABLE, redact(f"{type(e).__name__}: {e}"))
        return EXIT_RETRYABLE
    print(f"error: {redact(problem)}", file=sys.stderr, flush=True)
    _write_record(EXIT_BAD_INPUT, redact(problem))
    return EXIT_BAD_INPUT


def env_number(name: str, default: str, kind: type, env=os.environ):
    """The number a variable holds (`default` when unset or empty); `BadInput` naming it otherwise."""
    raw = env.get(name) or default
    try:
        value = kind(raw)
    except ValueError:
        raise BadInput(f"{name}={raw!r}: expected {'a whole number' if kind is int else 'a number'}") from None
    if value != value or value < 0 or value in (float("inf"),):
        raise BadInput(f"{name}={raw!r}: expected a finite number >= 0")
    return value


def torchrun_argv(script: str, env=os.environ) -> list[str] | None:
    """The torchrun command that re-launches `script finetune`, or None when one process is all it takes."""
    nproc = env_number("MYSPROJ_NPROC_PER_NODE", "1", int, env)
    nnodes = env_number("NNODES", "1", int, env)
    if "LOCAL_RANK" in env or (nproc <= 1 and nnodes <= 1):
        return None
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", env.get("NODE_RANK", "0"),
                 "--master-addr", env["MASTER_ADDR"], "--master-port", env.get("MASTER_PORT", "29500")]
    else:
        argv += ["--standalone"]
    return argv + [os.path.abspath(script), "finetune"]


def wait_for_dns(host: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.getaddrinfo(host, None)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(2)


def main(argv: list[str], script: str) -> int:
    """`jobs/stage.py <stage>`: one stage of the registry, its config from the MYSPROJ_* environment."""
    if len(argv) != 1 or argv[0] not in registry.STAGES:
        print(f"error: usage: {os.path.basename(script)} STAGE, one of {', '.join(registry.STAGES)} "
              f"(got {' '.join(argv) or 'nothing'})", file=sys.stderr)
        return EXIT_BAD_INPUT
    stage = argv[0]
    if stage == "finetune":
        try:
            relaunch = torchrun_argv(script)
            dns_wait = env_number("MYSPROJ_DNS_WAIT_SECONDS", "600", float)
        except BadInput as e:
            print(f"error: {redact(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if relaunch:
            master = os.environ.get("MASTER_ADDR")
            if master and not wait_for_dns(master, dns_wait):
                print(f"error: rank 0 ({master}) did not resolve; retrying the pod", file=sys.stderr)
                return EXIT_RETRYABLE
            os.execv(relaunch[0], relaunch)  # nosec B606 - torchrun re-runs this entry point, an argv list
    config_class = registry.STAGES[stage].config
    return run_job(stage, lambda: registry.run(stage, load_config(config_class, env=os.environ)))
