"""Kubernetes Job entry point of the probe stage: MYSPROJ_* env -> ProbeConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import ProbeConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("probe", lambda: registry.run("probe", load_config(ProbeConfig, env=os.environ))))
