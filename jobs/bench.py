"""Kubernetes Job entry point of `mysproj bench` (the chart's `bench` Job): MYSPROJ_BENCH_ARGS holds its arguments,
e.g. `finetune --strategy full`. Exit codes as for every stage: 0 done, 64 bad input, anything else retryable."""

import os
import shlex
import sys

from mysproj.cli import main
from mysproj.kube.entry import prepare_scratch

if __name__ == "__main__":
    prepare_scratch()
    sys.exit(main(["bench", *shlex.split(os.environ.get("MYSPROJ_BENCH_ARGS", ""))]))
