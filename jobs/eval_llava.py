"""Kubernetes Job entry point of the eval-llava stage: MYSPROJ_* env -> EvalLlavaConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import EvalLlavaConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("eval-llava", lambda: registry.run("eval-llava", load_config(EvalLlavaConfig, env=os.environ))))
