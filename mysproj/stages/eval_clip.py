"""`mysproj eval-clip`: CLIP zero-shot classification of a prepared split (Table 1's CLIP row).

protocol `paper` is the released code's `zero_shot_inference.py`: candidate labels = the lower-cased labels present in
the evaluated split, one prompt "This is a photo of {}." each (the HF pipeline's default template), CLIP's
resize + centre crop, argmax of the image-text similarity. protocol `openclip` averages open_clip's 80
ImageNet templates per class instead. Metrics are computed on the prepared labels (same classes, original case).

The speed paths (`decode`, `precision`, `fast_tower`, `compile`) are set up by `mysproj.speed.clip`. One batch is
in flight: batch k's encode is queued before batch k-1's results are read and batch k+1 is decoded, so decoding
overlaps the device's work.
"""

from __future__ import annotations

import logging

import torch

from mysproj.data.prepared import PreparedData
from mysproj.errors import BadInput
from mysproj.evaluation.metrics import classification_metrics, short
from mysproj.evaluation.predictions import write_predictions
from mysproj.evaluation.throughput import Throughput
from mysproj.models import clip as clip_models
from mysproj.models import compile_cache
from mysproj.progress import Progress
from mysproj.speed import clip as speed
from mysproj.speed.device import inference_device
from mysproj.storage.manifest import run_stage
from mysproj.storage.stage_time import processed
from mysproj.tracking import stage_metrics

log = logging.getLogger(__name__)
PAPER_TEMPLATE = "This is a photo of {}."


def run(cfg) -> dict:
    cache = speed.compile_cache_uri(cfg)
    return run_stage("eval-clip", cfg, lambda out: compile_cache.run_with(cache, lambda: _body(cfg, out)))


def templates(protocol: str) -> list:
    if protocol == "paper":
        return [PAPER_TEMPLATE.format]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # noqa: PLC0415 - open_clip imports wandb (where installed) when imported: only where it is used

    return list(OPENAI_IMAGENET_TEMPLATES)


def class_embeddings(clip, names: list[str], protocol: str, device: str, batch: int = 256):
    """[len(names), D] unit text embeddings; a template ensemble is the renormalised mean over templates."""

    temps = templates(protocol)
    texts = [t(n) for n in names for t in temps]
    feats = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            tokens = clip.tokenizer(texts[start:start + batch]).to(device)
            feats.append(clip.model.encode_text(tokens, normalize=True).float())
    emb = torch.cat(feats).view(len(names), len(temps), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def classify_batch(pixels, text, tower):
    """[n, classes] softmax over image-text similarities, left on the device (not synchronised)."""

    img = tower.embed(pixels, text.device)
    with torch.no_grad():
        return (100.0 * img @ text.T).softmax(dim=-1)


def zero_shot_probs(text, batches, tower):
    """Yield (probs on the CPU, sample indices) per batch, one batch behind the one queued on the device."""
    pending = None
    for pixels, idx in batches:
        probs = classify_batch(pixels, text, tower)
        if pending is not None:
            yield pending[0].cpu(), pending[1]
        pending = (probs, idx)
    if pending is not None:
        yield pending[0].cpu(), pending[1]


def _body(cfg, out) -> dict:
    data = PreparedData(cfg.data)
    samples = data.samples(cfg.split)
    if not samples:
        raise BadInput(f"{cfg.data}: split '{cfg.split}' has no samples")
    dev = inference_device()
    clip = clip_models.load_clip(cfg.model, cfg.arch, device=dev)
    present = {s.label for s in samples}
    labels = [c for c in data.classes if c in present]  # the released code's candidates: labels of the evaluated split
    names = [c.lower() for c in labels]
    text = class_embeddings(clip, names, cfg.protocol, dev)
    tower = speed.image_tower(clip, cfg)
    batches = speed.pixel_batches(clip, data, samples, cfg, dev)
    log.info("eval-clip: %d images, %d candidate labels, protocol %s, %s on %s, %s", len(samples), len(names),
             cfg.protocol, clip.kind, dev, speed.describe(cfg, tower))

    rows: list[dict] = []
    progress = Progress("eval-clip", len(samples), "images")
    rate = Throughput()
    for probs, idx in zero_shot_probs(text, batches, tower):
        # One conversion per batch: element-by-element tensor reads would make the main thread the bound.
        for i, p, best in zip(idx, probs.tolist(), probs.argmax(dim=-1).tolist()):
            s = samples[i]
            pred = labels[best]
            rows.append({"image": s.image, "label": s.label, "prediction": pred, "correct": pred == s.label,
                         "scores": [round(v, 6) for v in p]})
        progress.update(len(idx))
        rate.batch_done(len(idx))
    paths = speed.paths_ran(cfg, tower, batches)
    metrics = classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], data.classes)
    metrics.update(candidates=labels, protocol=cfg.protocol, model=cfg.model, split=cfg.split,
                   **{k: v for k, v in paths.items() if k != "compile"})
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-clip: %s", short(metrics))
    tracked = stage_metrics(cfg, out, "eval-clip", {f"eval/{k}": metrics[k] for k in ("macro_f1", "accuracy")})
    rates = rate.summary()
    return {**tracked, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
            **rates, "processed": processed(len(rows), "images", rates["images_per_s"]), "device": dev, **paths}
