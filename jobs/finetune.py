"""Kubernetes Job entry point of the finetune stage: MYSPROJ_* env -> FinetuneConfig -> the library call.

How it is launched (the chart sets the env; the command is always `python -u jobs/finetune.py`):
- 1 GPU per pod, 1 node: runs the stage in this process.
- N GPUs per pod (MYSPROJ_NPROC_PER_NODE=N) and/or M nodes (NNODES=M, one Job per node rank, NODE_RANK, and
  MASTER_ADDR = rank 0's name under the chart's headless Service): re-executes itself under
      torchrun --nnodes M --node-rank R --nproc-per-node N --master-addr MASTER_ADDR --master-port MASTER_PORT
  after waiting (up to MYSPROJ_DNS_WAIT_SECONDS) for MASTER_ADDR to resolve: rank 0's DNS record appears only once
  its pod exists, which may be after the other ranks start. Each torchrun worker then runs the stage (LOCAL_RANK set).
Exit 0 done, 64 bad input (never retried), anything else retryable.
"""

import os
import socket
import sys
import time

from mysproj.config import load_config
from mysproj.config.stages import FinetuneConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry


def torchrun_argv(env=os.environ) -> list[str] | None:
    """The torchrun command that re-launches this file, or None when one process is all it takes."""
    nproc = int(env.get("MYSPROJ_NPROC_PER_NODE", "1") or 1)
    nnodes = int(env.get("NNODES", "1") or 1)
    if "LOCAL_RANK" in env or (nproc <= 1 and nnodes <= 1):
        return None
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", env.get("NODE_RANK", "0"),
                 "--master-addr", env["MASTER_ADDR"], "--master-port", env.get("MASTER_PORT", "29500")]
    else:
        argv += ["--standalone"]
    return argv + [os.path.abspath(__file__)]


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


if __name__ == "__main__":
    argv = torchrun_argv()
    if argv:
        master = os.environ.get("MASTER_ADDR")
        if master and not wait_for_dns(master, float(os.environ.get("MYSPROJ_DNS_WAIT_SECONDS", "600"))):
            print(f"error: rank 0 ({master}) did not resolve; retrying the pod", file=sys.stderr)
            sys.exit(1)
        os.execv(argv[0], argv)
    sys.exit(run_job("finetune", lambda: registry.run("finetune", load_config(FinetuneConfig, env=os.environ))))
