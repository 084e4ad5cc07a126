"""Kubernetes Job entry point of every pipeline stage: `python -u jobs/stage.py <stage>` (prep, model-init,
finetune, merge, eval-clip, eval-llava, probe, report). MYSPROJ_* env -> the stage's config -> the library call;
fine-tuning re-launches itself under torchrun where the pod has several GPUs or ranks (mysproj/kube/entry.py).
Exit 0 done, 64 bad input (never retried), anything else retryable."""

import sys

from mysproj.kube.entry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], script=__file__))
