"""Kubernetes Job entry point of the pipeline controller: MYSPROJ_* env -> ControllerConfig -> the controller loop,
under the process contract every mysproj process follows (mysproj/process.py). Exit 0 when every stage is complete,
64 when the config is bad or a stage failed for good (its reason is logged and shown by `mysproj status`), anything
else retryable (a restarted controller resumes from the cluster and the bucket)."""

import os
import sys

from mysproj import process
from mysproj.config import load_config
from mysproj.kube import controller

if __name__ == "__main__":
    process.setup_logging()
    sys.exit(process.run("controller", lambda: controller.main(load_config(controller.ControllerConfig,
                                                                            env=os.environ))))
