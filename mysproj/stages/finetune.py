"""Stage `finetune`: LLaVA-1.5 on a prep output, projector-only (FT-Proj), end-to-end (FT-E2E) or LoRA.

Launch (the same code everywhere; the global batch stays fixed, gradient accumulation fills the gap):

    # CPU or one GPU (bf16; full on one GPU uses DeepSpeed ZeRO-3 with the optimizer offloaded to the CPU)
    mysproj finetune --strategy projector --model s3://b/models/llava-1.5-7b --data s3://b/r1/dtd/prep \\
        --out s3://b/r1/dtd/ft-projector/seed0/finetune

    # N GPUs on one node (DeepSpeed ZeRO-2 for projector, ZeRO-3 for full/lora)
    torchrun --standalone --nproc-per-node N -m mysproj.cli finetune --strategy full --model ... --data ... --out ...

    # M nodes x N GPUs (run on every node; NODE_RANK 0..M-1, MASTER_ADDR = node 0)
    torchrun --nnodes M --nproc-per-node N --node-rank $NODE_RANK --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:29500 -m mysproj.cli finetune --strategy full --model ... --data ... --out ...

Expected wall-clock (docs/paper.md): the paper's runs took ~1 h on 2x A100-80G for ~15k examples. Re-running the same
command after a crash resumes from the newest checkpoint under `<out>/checkpoints/` (same data order, same result).
"""

from __future__ import annotations

import os

from mysproj.models import compile_cache
from mysproj.storage.manifest import StageOutput, run_stage
from mysproj.training import setup
from mysproj.training.loop import train

STAGE = "finetune"


class _RankOutput(StageOutput):
    """Non-zero ranks take part in training but write nothing: rank 0 owns the output and its manifest."""

    def write_bytes(self, name, data):
        return self.path(name)

    def put_file(self, local, name, *args, **kwargs):
        return self.path(name)


def run(cfg) -> dict:
    if int(os.environ.get("RANK", "0")) == 0:
        return run_stage(STAGE, cfg, lambda out: _train(cfg, out, rank0=True))
    out = _RankOutput(cfg.out, STAGE, cfg)
    done = out.existing()
    if done:
        return done
    return {"summary": _train(cfg, out, rank0=False)}


def _train(cfg, out, rank0: bool) -> dict:
    """Training with the compile cache where layers compile (GPUs); every rank loads it, rank 0 stores."""

    return compile_cache.run_with(setup.compile_cache(cfg), lambda: train(cfg, out), store=rank0)
