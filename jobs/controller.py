"""Kubernetes Job entry point of the pipeline controller: MYSPROJ_* env -> ControllerConfig -> the controller loop.
Exit 0 when every stage is complete, 64 when the config is bad or a stage failed for good (its reason is logged
and shown by `mysproj status`), anything else retryable (a restarted controller resumes from the cluster and the
bucket)."""

import os
import sys

from mysproj.cli import setup_logging
from mysproj.config import load_config
from mysproj.errors import EXIT_BAD_INPUT, BadInput
from mysproj.kube import controller
from mysproj.kube.entry import prepare_scratch

if __name__ == "__main__":
    setup_logging()
    prepare_scratch()
    try:
        cfg = load_config(controller.ControllerConfig, env=os.environ)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(controller.main(cfg))
