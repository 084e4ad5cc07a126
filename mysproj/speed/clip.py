"""CLIP's speed paths for zero-shot classification (eval-clip): the on/off rules and the setup of each, switched
on by a field of the stage's config.

- `decode=device`: JPEG batches decoded, resized and normalised on the model's device
  (`mysproj.evaluation.device_decode`); `cpu`: PIL in the DataLoader workers, the released code's preprocessing.
- `precision=bf16`: the image tower's weights and activations in bf16 (the text embeddings stay fp32).
- `fast_tower` (default): the image tower as `mysproj.models.clip_tower` (the model's arithmetic without its layout
  copies, the last block at the class token), where it covers the model; else the model's `encode_image`.
- `compile`: the tower's blocks compiled once, every batch padded to `batch_size` so one graph serves them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mysproj.data.images import ExifUpright
from mysproj.evaluation.batches import image_batches
from mysproj.evaluation.device_decode import DeviceBatches, clip_pixels
from mysproj.models.clip_tower import ClipTower

log = logging.getLogger(__name__)


@dataclass
class ImageTower:
    dtype: object                 # torch dtype the image tower's weights (and so its input pixels) have
    encode: object                # pixels -> [n, D] unit image embeddings
    pad_to: int | None = None     # compiled: every batch is padded to this size, so the blocks compile once
    compiled_blocks: int = 0
    fast: bool = False            # `ClipTower` rather than the model's own encode_image

    def embed(self, pixels, device):
        """[n, D] float32 unit image embeddings of a batch of pixels, left on `device` (not synchronised)."""

        n = pixels.shape[0]
        pixels = pixels.to(device=device, dtype=self.dtype, non_blocking=True)
        if self.pad_to and n < self.pad_to:
            pixels = torch.cat([pixels, pixels.new_zeros((self.pad_to - n, *pixels.shape[1:]))])
        with torch.no_grad():
            return self.encode(pixels)[:n].float()


def _tower_modules(clip) -> tuple[list, list]:
    """(modules that compute image features, the transformer blocks among them) of an open_clip or HF CLIP."""
    if clip.kind == "hf":
        hf = clip.model.model
        return [hf.vision_model, hf.visual_projection], list(hf.vision_model.encoder.layers)
    visual = clip.model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return [visual], list(blocks or [])


def image_tower(clip, cfg) -> ImageTower:
    """Cast the image tower to `cfg.precision`, in place, and pick its forward: `ClipTower` where `cfg.fast_tower`
    and it covers the model, else the model's `encode_image`; `cfg.compile` compiles the blocks of either. Call
    after the class embeddings are computed: the text tower is left as loaded."""

    modules, blocks = _tower_modules(clip)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    for m in modules:
        m.to(dtype)
    pad_to = cfg.batch_size if cfg.compile else None
    tower = ClipTower.of(clip, compile=cfg.compile) if cfg.fast_tower else None
    if tower is not None:
        return ImageTower(dtype, tower.encode, pad_to, len(tower.blocks) if cfg.compile else 0, fast=True)
    if cfg.fast_tower:
        log.info("eval-clip: fast_tower does not cover this image tower; using the model's own forward")

    def encode(pixels):
        return clip.model.encode_image(pixels, normalize=True)

    if not cfg.compile:
        return ImageTower(dtype, encode)
    # Identical blocks share one compiled graph (parameters are graph inputs); a trunk without blocks is
    # compiled whole.
    targets = blocks or modules
    for m in targets:
        m.compile()
    return ImageTower(dtype, encode, pad_to, len(targets))


def pixel_batches(clip, data, samples, cfg, device: str):
    """Iterable of (pixels [n, 3, S, S], sample indices) by `cfg.decode`; `DeviceBatches` counts its decoders."""
    if cfg.decode == "device":
        return DeviceBatches(data, samples, clip_pixels(clip.preprocess), batch_size=cfg.batch_size,
                             workers=cfg.workers, device=device)
    return image_batches(data, samples, ExifUpright(clip.preprocess), cfg.batch_size, cfg.workers)


def compile_cache_uri(cfg) -> str | None:
    """`cfg.compile_cache` where the run compiles the tower."""
    return cfg.compile_cache if cfg.compile else None


def describe(cfg, tower: ImageTower) -> str:
    """The paths in one phrase, for the stage's log."""
    forward = "fast tower" if tower.fast else "the model's forward"
    compiled = f", {tower.compiled_blocks} blocks compiled" if cfg.compile else ""
    return f"decode {cfg.decode}, {cfg.precision}, {forward}{compiled}"


def paths_ran(cfg, tower: ImageTower, batches) -> dict:
    """Which paths ran, for metrics.json and the stage summary (`device_decoded_images`: images decoded on the
    device; the rest went through PIL)."""
    return {"decode": cfg.decode, "precision": cfg.precision, "compile": cfg.compile, "fast_tower": tower.fast,
            "device_decoded_images": getattr(batches, "device_images", 0)}
