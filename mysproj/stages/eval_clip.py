"""`mysproj eval-clip`: CLIP zero-shot classification of a prepared split (Table 1's CLIP row).

protocol `paper` is the seed's `zero_shot_inference.py`: candidate labels = the lower-cased labels present in
the evaluated split, one prompt "This is a photo of {}." each (the HF pipeline's default template), CLIP's
resize + centre crop, argmax of the image-text similarity. protocol `openclip` averages open_clip's 80
ImageNet templates per class instead. Metrics are computed on the prepared labels (same classes, original case).

Speed options (issue 6): `decode=device` decodes JPEG batches on the model's device
(`mysproj.evaluation.device_decode`), `precision=bf16` casts the image tower, `fast_tower` (default) runs it as
`mysproj.models.clip_tower` (the model's arithmetic without its layout copies; the last block at the class
token), `compile` compiles its blocks. One batch is in flight: batch k's encode is queued before batch k-1's
results are read and batch k+1 is decoded, so decoding overlaps the device's work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)
PAPER_TEMPLATE = "This is a photo of {}."


def run(cfg) -> dict:
    from mysproj.models import compile_cache
    from mysproj.storage.manifest import run_stage

    cache = cfg.compile_cache if cfg.compile else None
    return run_stage("eval-clip", cfg, lambda out: compile_cache.run_with(cache, lambda: _body(cfg, out)))


def templates(protocol: str) -> list:
    if protocol == "paper":
        return [PAPER_TEMPLATE.format]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def class_embeddings(clip, names: list[str], protocol: str, device: str, batch: int = 256):
    """[len(names), D] unit text embeddings; a template ensemble is the renormalised mean over templates."""
    import torch

    temps = templates(protocol)
    texts = [t(n) for n in names for t in temps]
    feats = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            tokens = clip.tokenizer(texts[start:start + batch]).to(device)
            feats.append(clip.model.encode_text(tokens, normalize=True).float())
    emb = torch.cat(feats).view(len(names), len(temps), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


@dataclass
class ImageTower:
    dtype: object                 # torch dtype the image tower's weights (and so its input pixels) have
    encode: object                # pixels -> [n, D] unit image embeddings
    pad_to: int | None = None     # compiled: every batch is padded to this size, so the blocks compile once
    compiled_blocks: int = 0
    fast: bool = False            # `ClipTower` rather than the model's own encode_image


def _tower_modules(clip) -> tuple[list, list]:
    """(modules that compute image features, the transformer blocks among them) of an open_clip or HF CLIP."""
    if clip.kind == "hf":
        hf = clip.model.model
        return [hf.vision_model, hf.visual_projection], list(hf.vision_model.encoder.layers)
    visual = clip.model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return [visual], list(blocks or [])


def prepare_image_tower(clip, precision: str, compile: bool, batch_size: int, fast: bool = True) -> ImageTower:
    """Cast the image tower to `precision`, in place, and pick its forward: `ClipTower` where `fast` and it
    covers the model, else the model's `encode_image`; `compile` compiles the blocks of either. Call after the
    class embeddings are computed: the text tower is left as loaded."""
    import torch

    from mysproj.models.clip_tower import ClipTower

    modules, blocks = _tower_modules(clip)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for m in modules:
        m.to(dtype)
    pad_to = batch_size if compile else None
    tower = ClipTower.of(clip, compile=compile) if fast else None
    if tower is not None:
        return ImageTower(dtype, tower.encode, pad_to, len(tower.blocks) if compile else 0, fast=True)
    if fast:
        log.info("eval-clip: fast_tower does not cover this image tower; using the model's own forward")

    def encode(pixels):
        return clip.model.encode_image(pixels, normalize=True)

    if not compile:
        return ImageTower(dtype, encode)
    # Identical blocks share one compiled graph (parameters are graph inputs); a trunk without blocks is
    # compiled whole.
    targets = blocks or modules
    for m in targets:
        m.compile()
    return ImageTower(dtype, encode, pad_to, len(targets))


def classify_batch(clip, pixels, text, tower: ImageTower):
    """[n, classes] softmax over image-text similarities, left on the device (not synchronised)."""
    import torch

    n = pixels.shape[0]
    pixels = pixels.to(device=text.device, dtype=tower.dtype, non_blocking=True)
    if tower.pad_to and n < tower.pad_to:
        pixels = torch.cat([pixels, pixels.new_zeros((tower.pad_to - n, *pixels.shape[1:]))])
    with torch.no_grad():
        img = tower.encode(pixels)[:n].float()
        return (100.0 * img @ text.T).softmax(dim=-1)


def pixel_batches(clip, data, samples, cfg, device: str):
    """Iterable of (pixels [n, 3, S, S], sample indices) by `cfg.decode`; `DeviceBatches` counts its decoders."""
    if cfg.decode == "device":
        from mysproj.evaluation.device_decode import DeviceBatches

        return DeviceBatches(data, samples, clip.preprocess, batch_size=cfg.batch_size, workers=cfg.workers,
                             device=device)
    return _pil_batches(clip, data, samples, cfg)


def _pil_batches(clip, data, samples, cfg):
    import torch

    from mysproj.evaluation.batches import image_batches

    for images, idx in image_batches(data, samples, clip.preprocess, cfg.batch_size, cfg.workers):
        yield torch.stack(images), idx


def zero_shot_probs(clip, text, batches, tower: ImageTower):
    """Yield (probs on the CPU, sample indices) per batch, one batch behind the one queued on the device."""
    pending = None
    for pixels, idx in batches:
        probs = classify_batch(clip, pixels, text, tower)
        if pending is not None:
            yield pending[0].cpu(), pending[1]
        pending = (probs, idx)
    if pending is not None:
        yield pending[0].cpu(), pending[1]


def _body(cfg, out) -> dict:
    from mysproj.data.prepared import PreparedData
    from mysproj.errors import BadInput
    from mysproj.evaluation.batches import Throughput, write_predictions
    from mysproj.evaluation.batches import device as pick_device
    from mysproj.evaluation.metrics import classification_metrics, short
    from mysproj.models.clip import load_clip
    from mysproj.progress import Progress
    from mysproj.storage.stage_time import processed

    data = PreparedData(cfg.data)
    samples = data.samples(cfg.split)
    if not samples:
        raise BadInput(f"{cfg.data}: split '{cfg.split}' has no samples")
    dev = pick_device()
    clip = load_clip(cfg.model, cfg.arch, device=dev)
    present = {s.label for s in samples}
    labels = [c for c in data.classes if c in present]  # the seed's candidates: labels of the evaluated split
    names = [c.lower() for c in labels]
    text = class_embeddings(clip, names, cfg.protocol, dev)
    tower = prepare_image_tower(clip, cfg.precision, cfg.compile, cfg.batch_size, cfg.fast_tower)
    batches = pixel_batches(clip, data, samples, cfg, dev)
    log.info("eval-clip: %d images, %d candidate labels, protocol %s, %s on %s, decode %s, %s, %s%s", len(samples),
             len(names), cfg.protocol, clip.kind, dev, cfg.decode, cfg.precision,
             "fast tower" if tower.fast else "the model's forward",
             f", {tower.compiled_blocks} blocks compiled" if cfg.compile else "")

    rows: list[dict] = []
    progress = Progress("eval-clip", len(samples), "images")
    speed = Throughput()
    for probs, idx in zero_shot_probs(clip, text, batches, tower):
        # One conversion per batch: per-element tensor reads cost the main thread more than decoding at ~1k/s.
        for i, p, best in zip(idx, probs.tolist(), probs.argmax(dim=-1).tolist()):
            s = samples[i]
            pred = labels[best]
            rows.append({"image": s.image, "label": s.label, "prediction": pred, "correct": pred == s.label,
                         "scores": [round(v, 6) for v in p]})
        progress.update(len(idx))
        speed.batch_done(len(idx))
    device_decoded = getattr(batches, "device_images", 0)
    metrics = classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], data.classes)
    metrics.update(candidates=labels, protocol=cfg.protocol, model=cfg.model, split=cfg.split, decode=cfg.decode,
                   precision=cfg.precision, fast_tower=tower.fast, device_decoded_images=device_decoded)
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-clip: %s", short(metrics))
    rates = speed.summary()
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
            **rates, "processed": processed(len(rows), "images", rates["images_per_s"]), "device": dev,
            "decode": cfg.decode, "precision": cfg.precision,
            "compile": cfg.compile, "fast_tower": tower.fast, "device_decoded_images": device_decoded}
