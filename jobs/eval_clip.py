"""Kubernetes Job entry point of the eval-clip stage: MYSPROJ_* env -> EvalClipConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import EvalClipConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("eval-clip", lambda: registry.run("eval-clip", load_config(EvalClipConfig, env=os.environ))))
