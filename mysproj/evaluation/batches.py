"""Image batches for the evals and the probe: decoding (and a per-image transform) in DataLoader workers,
the model step in the main process; never one image at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from mysproj.data.image_checks import effective_workers
from mysproj.errors import worker_errors


class SampleImages:
    """Dataset of (transform(image), index) for `samples` of a PreparedData."""

    def __init__(self, data, samples, transform: Callable):
        self.data, self.samples, self.transform = data, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = self.data.open_image(self.samples[i])
        return self.transform(img), i


def _collate(batch):
    return torch.stack([x for x, _ in batch]), [i for _, i in batch]


AUTO_WORKERS_CAP = 16


def decode_workers(requested: int) -> int:
    """DataLoader workers for `requested` (a stage's `workers` field): -1 = one per core this process may use, at most
    AUTO_WORKERS_CAP (decoding and resizing full-size photos is what bounds the image-only stages), 0 = this
    process."""
    cores = effective_workers(0)
    return min(AUTO_WORKERS_CAP, cores) if requested < 0 else min(requested, cores)


def image_batches(data, samples, transform: Callable, batch_size: int, workers: int):
    """Yield (the transformed images stacked [n, ...], list of sample indices) in sample order; `transform` makes a
    tensor of one shape from each image."""

    workers = decode_workers(workers)
    loader = DataLoader(SampleImages(data, samples, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available())
    yield from worker_errors(loader)
