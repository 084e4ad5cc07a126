"""Timing one unit of work (a training step, one evaluation batch) the same way for ours and the baseline.

On CUDA every step is bracketed by CUDA events on the current stream, so the time is the GPU's, not the Python
launch loop's; on CPU a monotonic clock is read around each step. Warm-up steps (compilation, allocator growth,
cuDNN/cuBLAS heuristics) are run first and not recorded; the median of the recorded steps is the result, with
min/max kept so a noisy run is visible. Peak memory is `torch.cuda.max_memory_allocated` over the timed steps.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mysproj.bench.profile import profile_step


@dataclass
class Timing:
    step_s: list[float] = field(default_factory=list)   # recorded steps, seconds each
    peak_mem_gib: float | None = None                   # CUDA only
    profile: dict | None = None                         # `mysproj.bench.profile.profile_step` of one more step

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    def as_dict(self) -> dict:
        out = {"median_step_s": self.median_s, "min_step_s": min(self.step_s), "max_step_s": max(self.step_s),
               "steps": len(self.step_s), "peak_mem_gib": self.peak_mem_gib}
        return out if self.profile is None else {**out, "profile": self.profile}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[int], object], *, device: str, warmup: int, steps: int,
               clock: str = "auto", profile: bool = False) -> Timing:
    """Run `step(i)` `warmup` times untimed, then `steps` times timed; returns per-step seconds and peak memory.

    `step` gets the step index so it can pick its batch. `clock`: "events" (CUDA events on the current stream),
    "wall" (a wall clock with the device drained before and after each step: for steps whose host work, such as
    JPEG decode in worker processes, is part of what is measured), "pipelined" (a wall clock for a loop that
    keeps one batch in flight: the device is drained only before the first timed step and after the last, since
    draining it every step would serialise the overlap being measured; a step's time is the interval between
    consecutive results, so the steps add up to the run) or "auto" (events on CUDA, wall on CPU). `profile`: one
    more step afterwards, untimed, under the profiler (`Timing.profile`)."""

    if steps < 1:
        raise ValueError("steps must be >= 1")
    cuda = device.startswith("cuda")
    events = cuda and clock in ("auto", "events")
    for i in range(warmup):
        step(i)
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timing = Timing()
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        if clock == "pipelined":
            step(i)
            now = time.perf_counter()
            timing.step_s.append(now - t)
            t = now
        elif events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            timing.step_s.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            step(i)
            synchronize(device)
            timing.step_s.append(time.perf_counter() - t0)
    if clock == "pipelined":  # the work still queued belongs to the last step
        synchronize(device)
        timing.step_s[-1] += time.perf_counter() - t
    if cuda:
        timing.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        timing.profile = profile_step(lambda: step(warmup + steps), device)
    return timing


def free_memory(device: str) -> None:
    """Drop cached blocks between ours and the baseline so one's peak does not hide in the other's numbers."""

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
