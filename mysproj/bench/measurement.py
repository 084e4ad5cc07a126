"""Benchmark measurements: one `Measurement` per variant (ours, the plain-transformers baseline), the ratios between
them, a fixed-width table (printed last) and a JSON document."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field

import torch

from mysproj.bench.flops import mfu
from mysproj.bench.profile import summary
from mysproj.bench.timing import Timing


@dataclass
class Measurement:
    variant: str              # "ours", "baseline", "baseline-b1", ...
    what: str                 # one line: the code path measured
    batch_size: int
    items_per_step: int       # images or samples one timed step processes
    timing: Timing
    flops_per_item: float
    unit: str = "samples"     # samples | images
    n_devices: int = 1
    extra: dict = field(default_factory=dict)  # losses, predictions digest, strategy details

    @property
    def items_per_s(self) -> float:
        return self.items_per_step / self.timing.median_s

    def mfu(self, peak_tflops: float) -> float:
        return mfu(self.flops_per_item, self.items_per_s, peak_tflops, self.n_devices)

    def as_dict(self, peak_tflops: float) -> dict:
        return {"variant": self.variant, "what": self.what, "batch_size": self.batch_size,
                "items_per_step": self.items_per_step, "unit": self.unit, "n_devices": self.n_devices,
                f"{self.unit}_per_s": self.items_per_s, "items_per_s": self.items_per_s,
                "model_tflops_per_item": self.flops_per_item / 1e12, "mfu": self.mfu(peak_tflops),
                **self.timing.as_dict(), **self.extra}


@dataclass
class BenchReport:
    bench: str
    preset: str
    device: str
    card: str
    peak_tflops: float
    settings: dict
    flops_breakdown: dict
    measurements: list[Measurement] = field(default_factory=list)

    def ratios(self) -> dict:
        """ours / each baseline variant, on items/s (= on MFU: both are charged the same FLOPs per item)."""
        ours = [m for m in self.measurements if m.variant == "ours"]
        if not ours:
            return {}
        return {f"ours/{m.variant}": ours[0].items_per_s / m.items_per_s
                for m in self.measurements if m.variant.startswith("baseline")}

    def as_dict(self) -> dict:
        return {"bench": self.bench, "preset": self.preset, "device": self.device, "card": self.card,
                "peak_tflops": self.peak_tflops, "host": platform.node(), "settings": self.settings,
                "model_tflops_per_item": {k: v / 1e12 for k, v in self.flops_breakdown.items()},
                "results": [m.as_dict(self.peak_tflops) for m in self.measurements], "ratios": self.ratios()}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)

    def table(self) -> str:
        head = ["variant", "batch", "items/s", "step ms", "MFU", "peak GiB", "ours/this"]
        ours = next((m for m in self.measurements if m.variant == "ours"), None)
        rows = []
        for m in self.measurements:
            ratio = "" if ours is None or m is ours else f"{ours.items_per_s / m.items_per_s:.2f}x"
            mem = "-" if m.timing.peak_mem_gib is None else f"{m.timing.peak_mem_gib:.1f}"
            rows.append([m.variant, str(m.batch_size), f"{m.items_per_s:.2f} {m.unit}",
                         f"{m.timing.median_s * 1e3:.1f}", f"{100 * m.mfu(self.peak_tflops):.1f}%", mem, ratio])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [f"bench {self.bench} | preset {self.preset} | {self.card} | "
                 f"{self.flops_breakdown.get('total', 0) / 1e12:.3g} model TFLOP/item | "
                 f"MFU against {self.peak_tflops:g} TFLOP/s"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
        agreement = [f"{m.variant}: {100 * m.extra['same_answers']:.1f}%" for m in self.measurements
                     if "same_answers" in m.extra]
        if agreement:  # a faster path (fp8, compile) beside the model as loaded, on the same batch
            lines.append("same answers as the model without fp8/compile: " + ", ".join(agreement))
        for m in self.measurements:
            if m.timing.profile is not None:
                lines.append(summary(m.variant, m.timing.profile))
        return "\n".join(lines)


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        n = int(os.environ.get("WORLD_SIZE", "1"))  # cards this run uses (one per process), not the host's
        name = torch.cuda.get_device_name()
        return f"{n}x {name}" if n > 1 else name
    return f"CPU ({platform.processor() or platform.machine()})"
