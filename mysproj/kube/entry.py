"""The Kubernetes Job entry point of every stage, `python -u jobs/stage.py <stage>`: MYSPROJ_* env -> the stage's
config -> the same library call the CLI makes, under the contract every mysproj process follows
(`mysproj.process`: logging, scratch folders on the pod's emptyDir, exit codes 0 / 64 never retried / 143 / 1
retryable, and the failure record `<out>/_FAILURE.json` that the controller and `mysproj status` show as the
reason where no kubelet reports the container's exit code or termination message).

Fine-tuning is launched explicitly (the chart sets the env; the command stays `jobs/stage.py finetune`):
- 1 GPU per pod, 1 node: the stage runs in this process.
- N GPUs per pod (MYSPROJ_NPROC_PER_NODE=N) and/or M nodes (NNODES=M, one Job per node rank, NODE_RANK, and
  MASTER_ADDR = rank 0's name under the chart's headless Service): the entry point re-executes itself under
      torchrun --nnodes M --node-rank R --nproc-per-node N --master-addr MASTER_ADDR --master-port MASTER_PORT
  after waiting (up to MYSPROJ_DNS_WAIT_SECONDS) for MASTER_ADDR to resolve: rank 0's DNS record appears only once
  its pod exists, which may be after the other ranks start. Each torchrun worker then runs the stage (LOCAL_RANK set).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from mysproj.config import load_config
from mysproj.errors import EXIT_BAD_INPUT, BadInput, redact
from mysproj.process import EXIT_RETRYABLE, run_stage
from mysproj.stages import registry

log = logging.getLogger("mysproj.job")


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
    return run_stage(stage, lambda: registry.run(stage, load_config(config_class, env=os.environ)))
