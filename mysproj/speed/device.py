"""The device a stage runs on, with the matmul settings every GPU stage shares."""

from __future__ import annotations

import torch


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores, as the released scripts' `--tf32 True`."""

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def inference_device() -> str:
    """"cuda" where a GPU is visible (TF32 allowed), else "cpu"."""

    if torch.cuda.is_available():
        allow_tf32()
        return "cuda"
    return "cpu"


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
