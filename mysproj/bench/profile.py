"""`mysproj bench --profile`: where one step's device time goes, grouped by kind of kernel.

One extra step after the timed ones runs under `torch.profiler`. On CUDA the GPU kernels are counted
(`device_time_total`). On CPU each operator's self time is counted, so nested operators are not counted twice. The
groups answer the first question of any optimisation: is the step bound by matmuls (then only fewer FLOPs or lower
precision help), by attention, or by the elementwise work that fusion removes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = (  # first match wins; names are lower-cased kernel or operator names. Inductor names its kernels after
    # the ops they fuse ("triton_poi_fused__scaled_dot_product_..."), and cuDNN's attention kernels carry "sm90", so
    # Triton goes first and attention before the matmuls.
    ("fused (triton)", ("triton",)),
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::_scaled_mm", "aten::baddbmm")),
    ("copy/memset", ("memcpy", "memset", "copy_kernel", "aten::copy_", "aten::cat", "catarray")),
)
TOP = 12


def kernel_kind(name: str) -> str:
    n = name.lower()
    for kind, needles in KINDS:
        if any(k in n for k in needles):
            return kind
    return "other"


def profile_step(step: Callable[[], object], device: str) -> dict:
    """Run `step()` once under the profiler; returns {"ms": total, "kinds": {kind: ms}, "top": [[ms, calls, name]]}."""

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if cuda else ev.self_cpu_time_total
        if us > 0:
            rows.append((us / 1e3, ev.count, ev.key))
    kinds = Counter()
    for ms, _, name in rows:
        kinds[kernel_kind(name)] += ms
    rows.sort(reverse=True)
    return {"ms": sum(r[0] for r in rows), "kinds": dict(kinds.most_common()),
            "top": [[round(ms, 3), n, name[:120]] for ms, n, name in rows[:TOP]]}


def summary(variant: str, prof: dict) -> str:
    total = prof["ms"] or 1.0
    kinds = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in prof["kinds"].items())
    top = "\n".join(f"    {ms:9.2f} ms x{n:<5d} {name}" for ms, n, name in prof["top"])
    return f"profile of one {variant} step ({prof['ms']:.1f} ms profiled): {kinds}\n{top}"
