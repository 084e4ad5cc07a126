"""`mysproj eval-clip`: CLIP zero-shot classification of a prepared split (Table 1's CLIP row).

protocol `paper` is the seed's `zero_shot_inference.py`: candidate labels = the lower-cased labels present in
the evaluated split, one prompt "This is a photo of {}." each (the HF pipeline's default template), CLIP's
resize + centre crop, argmax of the image-text similarity. protocol `openclip` averages open_clip's 80
ImageNet templates per class instead. Metrics are computed on the prepared labels (same classes, original case).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
PAPER_TEMPLATE = "This is a photo of {}."


def run(cfg) -> dict:
    from mysproj.storage.manifest import run_stage

    return run_stage("eval-clip", cfg, lambda out: _body(cfg, out))


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


def _body(cfg, out) -> dict:
    import torch

    from mysproj.data.prepared import PreparedData
    from mysproj.errors import BadInput
    from mysproj.evaluation.batches import Throughput, image_batches, write_predictions
    from mysproj.evaluation.batches import device as pick_device
    from mysproj.evaluation.metrics import classification_metrics, short
    from mysproj.models.clip import load_clip
    from mysproj.progress import Progress

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
    log.info("eval-clip: %d images, %d candidate labels, protocol %s, %s on %s", len(samples), len(names),
             cfg.protocol, clip.kind, dev)

    rows: list[dict] = []
    progress = Progress("eval-clip", len(samples), "images")
    speed = Throughput()
    with torch.no_grad():
        for images, idx in image_batches(data, samples, clip.preprocess, cfg.batch_size, cfg.workers):
            pixels = torch.stack(images).to(dev)
            img = clip.model.encode_image(pixels, normalize=True).float()
            probs = (100.0 * img @ text.T).softmax(dim=-1).cpu()
            for i, p in zip(idx, probs):
                s = samples[i]
                pred = labels[int(p.argmax())]
                rows.append({"image": s.image, "label": s.label, "prediction": pred, "correct": pred == s.label,
                             "scores": [round(float(v), 6) for v in p]})
            progress.update(len(idx))
            speed.batch_done(len(idx))
    metrics = classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], data.classes)
    metrics.update(candidates=labels, protocol=cfg.protocol, model=cfg.model, split=cfg.split)
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-clip: %s", short(metrics))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
            **speed.summary(), "device": dev}
