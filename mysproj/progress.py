"""Progress lines for long loops: done/total, rate and ETA, at most every `interval` seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("mysproj.progress")


class Progress:
    def __init__(self, what: str, total: int, unit: str = "items", interval: float = 10.0):
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            log.info("%s", self.line(extra))

    def line(self, extra: str = "") -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        tail = f" {extra}" if extra else ""
        return (f"{self.what}: {self.done}/{self.total} {self.unit} "
                f"({rate:.1f} {self.unit}/s, ETA {eta_s}){tail}")
