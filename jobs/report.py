"""Kubernetes Job entry point of the report stage: MYSPROJ_* env -> ReportConfig -> the library call.
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import os
import sys

from mysproj.config import load_config
from mysproj.config.stages import ReportConfig
from mysproj.kube.entry import run_job
from mysproj.stages import registry

if __name__ == "__main__":
    sys.exit(run_job("report", lambda: registry.run("report", load_config(ReportConfig, env=os.environ))))
