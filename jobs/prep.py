"""Kubernetes Job entry point of the prep stage: MYSPROJ_* env -> PrepConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import PrepConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("prep", lambda: registry.run("prep", load_config(PrepConfig, env=os.environ))))
