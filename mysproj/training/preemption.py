"""Stopping a fine-tuning run on SIGTERM at a point it can resume from.

Kubernetes sends SIGTERM when it evicts a pod or drains its node, then SIGKILL after the pod's grace period. The
handler only records the request; the loop asks `should_stop()` between optimizer steps, so the step in flight
finishes, a checkpoint is written and the process exits with `EXIT_PREEMPTED` (retryable): the retried pod resumes
from that checkpoint. Under torchrun every rank gets the signal (torchrun passes it on), maybe between different
steps; `should_stop()` is a collective (the maximum of every rank's flag), so all ranks stop after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator

import torch

from mysproj.errors import Preempted

log = logging.getLogger("mysproj.finetune")


class StopOnSigterm:
    """Context manager: while active, SIGTERM sets a flag instead of ending the process."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.warning("finetune: SIGTERM received; stopping after the current optimizer step with a checkpoint")
        self.requested = True

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank must call it at the same step)."""
        if self.acc.num_processes == 1:
            return self.requested

        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="max").item() > 0)

    def steps(self, start: int, total: int, save: Callable[[int], bool]) -> Iterator[int]:
        """`range(start, total)`, SIGTERM-aware while it runs: when a stop is requested, after the step in flight
        `save(step)` writes a checkpoint of it (returning whether one exists) and `Preempted` is raised."""
        with self:
            for step in range(start, total):
                if step > start and self.should_stop():
                    saved = save(step)
                    raise Preempted(f"SIGTERM: fine-tuning stopped after optimizer step {step} of {total}, "
                                    + (f"checkpoint step {step} written; the same command resumes from it" if saved
                                       else "without a checkpoint (save_checkpoints is off)"))
                yield step
