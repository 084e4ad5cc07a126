"""Kubernetes Job entry point of the merge stage: MYSPROJ_* env -> MergeConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import MergeConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("merge", lambda: registry.run("merge", load_config(MergeConfig, env=os.environ))))
