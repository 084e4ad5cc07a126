"""How fast a stage's loop went, for its summary."""

from __future__ import annotations

import time


class Throughput:
    """images/s over the whole loop and after the first batch (worker start-up and CUDA warm-up excluded)."""

    def __init__(self):
        self._clock = time.monotonic
        self.t0 = self._clock()
        self.t_first = None
        self.n = self.n_first = 0

    def batch_done(self, n: int) -> None:
        self.n += n
        if self.t_first is None:
            self.t_first, self.n_first = self._clock(), self.n

    def summary(self) -> dict:
        now = self._clock()
        out = {"images_per_s": round(self.n / max(now - self.t0, 1e-9), 3)}
        if self.t_first is not None and self.n > self.n_first:
            out["steady_images_per_s"] = round((self.n - self.n_first) / max(now - self.t_first, 1e-9), 3)
        return out
