"""Kubernetes Job entry point of the model-init stage: MYSPROJ_* env -> ModelInitConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import ModelInitConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("model-init", lambda: registry.run("model-init", load_config(ModelInitConfig, env=os.environ))))
