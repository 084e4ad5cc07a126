"""`mysproj probe`: how much class information the image features carry before and after the projector
(the paper's Tables 2 and 3), measured by an independent MLP per feature kind.

Features per image (train and test split), from one pass of LLaVA's vision tower + projector:
    pre_cls  = CLIP's pooled image representation: the last layer's CLS after the post-LayerNorm (`pooler_output`);
    pre_mean = mean of the layer `vision_feature_layer` (-2) patch features, i.e. of the tokens the projector consumes;
    post     = the projector output mean-pooled over all image tokens (the released code's `torch.mean(dim=1)`).
The released probe script reads one 1024-d vector per image whose extractor was never released, so both readings
of "pre" are probed, each by its own MLP; `pre_pooling` names the headline one (`pre`, Table 3's first columns).
They are stored in the output (`features/<split>.safetensors` + `features/<split>.parquet`), then
`mysproj.evaluation.probe_mlp` trains the paper's MLPs and `metrics.json` gets a `pre_cls`, `pre_mean`, `post`
and (a copy of the headline one) `pre` block.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from mysproj.data.prepared import PreparedData
from mysproj.errors import BadInput
from mysproj.evaluation import probe_mlp
from mysproj.evaluation.metrics import classification_metrics, short
from mysproj.evaluation.predictions import write_predictions
from mysproj.progress import Progress
from mysproj.speed import llava as speed
from mysproj.speed.device import inference_device
from mysproj.storage.manifest import run_stage
from mysproj.storage.stage_time import processed
from mysproj.tracking import stage_metrics

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    return run_stage("probe", cfg, lambda out: _body(cfg, out))


PRE_KINDS = ("pre_cls", "pre_mean")


def image_feature_set(model, pixel_values) -> dict:
    """{'pre_cls': [B, D_vision], 'pre_mean': [B, D_vision], 'post': [B, D_text]} float32 features for a batch of
    images, all from one forward pass of the vision tower and the projector."""

    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: the probe supports a single layer")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        post = torch.stack([f.float().mean(dim=0) for f in out.pooler_output])
        tower = model.model.vision_tower
        norm = tower.post_layernorm if hasattr(tower, "post_layernorm") else tower.vision_model.post_layernorm
        cls = norm(out.hidden_states[-1][:, 0]).float()
        hidden = out.hidden_states[layer]
        patches = hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden
        mean = patches.float().mean(dim=1)
    return {"pre_cls": cls, "pre_mean": mean, "post": post}


def image_features(model, pixel_values, pre_pooling: str = "cls"):
    """(pre [B, D_vision] by `pre_pooling`, post [B, D_text]) float32 features for a batch of images."""
    feats = image_feature_set(model, pixel_values)
    return feats[f"pre_{pre_pooling}"], feats["post"]


FEATURE_KINDS = (*PRE_KINDS, "post")


def extract(loaded, data, samples, cfg, dev):
    """({'pre_cls', 'pre_mean': [N, Dv], 'post': [N, Dt]} float32 CPU tensors in sample order, how many images the
    device decoded)."""

    rows: dict = {k: [None] * len(samples) for k in FEATURE_KINDS}
    progress = Progress("probe features", len(samples), "images")
    batches = speed.pixel_batches(cfg, loaded.image_processor, data, samples, dev, loaded.model.dtype)
    for pixels, idx in batches:
        batch = image_feature_set(loaded.model, pixels)
        for kind in FEATURE_KINDS:
            for j, i in enumerate(idx):
                rows[kind][i] = batch[kind][j].cpu()
        progress.update(len(idx))
    return {kind: torch.stack(v) for kind, v in rows.items()}, batches.device_images


def _save_features(out, split: str, samples, feats: dict, pre_pooling: str) -> None:
    labels = torch.tensor([s.label_id for s in samples], dtype=torch.long)
    tensors = {k: feats[k].contiguous() for k in FEATURE_KINDS}
    tensors["pre"] = feats[f"pre_{pre_pooling}"].clone()  # the headline vector, under its older name
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{split}.safetensors")
        save_file({**tensors, "label_id": labels}, path)
        out.put_file(path, f"features/{split}.safetensors")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"row": i, "image": s.image, "label": s.label, "label_id": s.label_id}
                                         for i, s in enumerate(samples)]), buf)
    out.write_bytes(f"features/{split}.parquet", buf.getvalue())


def _body(cfg, out) -> dict:
    data = PreparedData(cfg.data)
    splits = {"train": data.samples("train"), "test": data.samples("test")}
    for name, samples in splits.items():
        if not samples:
            raise BadInput(f"{cfg.data}: split '{name}' has no samples; the probe needs both train and test")
    dev = inference_device()
    loaded = speed.load(cfg, dev, vision_only=cfg.vision_only)
    vision_only = speed.language_model_skipped(loaded)
    feats, device_images = {}, 0
    for name, samples in splits.items():
        feats[name], decoded = extract(loaded, data, samples, cfg, dev)
        device_images += decoded
        _save_features(out, name, samples, feats[name], cfg.pre_pooling)
    del loaded

    y_train = [s.label_id for s in splits["train"]]
    test = splits["test"]
    metrics: dict = {"protocol": cfg.protocol, "pre_pooling": cfg.pre_pooling, "seed": cfg.seed, "model": cfg.model,
                     "decode": cfg.decode, "device_decoded_images": device_images}
    preds: dict[str, list] = {}
    for kind in FEATURE_KINDS:
        x_train = feats["train"][kind].numpy()
        # both pre vectors get the paper's pre-projection MLP (A.3), each its own
        mlp, history = probe_mlp.train_probe("post" if kind == "post" else "pre", x_train, y_train,
                                             len(data.classes), protocol=cfg.protocol, seed=cfg.seed,
                                             max_epochs=cfg.max_epochs, patience=cfg.patience,
                                             val_fraction=cfg.val_fraction, device=dev)
        pred_ids = probe_mlp.predict(mlp, feats["test"][kind].numpy(), device=dev)
        preds[kind] = [data.classes[int(i)] for i in pred_ids]
        m = classification_metrics([s.label for s in test], preds[kind], data.classes)
        m.update(feature_dim=int(x_train.shape[1]), training=history)
        metrics[kind] = m
        log.info("probe %s: %s", kind, short(m))
    headline = f"pre_{cfg.pre_pooling}"
    metrics["pre"] = {**metrics[headline], "vector": cfg.pre_pooling}
    preds["pre"] = preds[headline]
    out.write_json("metrics.json", metrics)
    tracked = stage_metrics(cfg, out, "probe", {f"probe/{kind}_{k}": metrics[kind][k] for kind in ("pre", "post")
                                                for k in ("macro_f1", "accuracy")})
    write_predictions(out, [{"image": s.image, "label": s.label, "pre_prediction": preds["pre"][i],
                             "pre_cls_prediction": preds["pre_cls"][i], "pre_mean_prediction": preds["pre_mean"][i],
                             "post_prediction": preds["post"][i]} for i, s in enumerate(test)])
    return {**tracked, "pre_macro_f1": metrics["pre"]["macro_f1"], "post_macro_f1": metrics["post"]["macro_f1"],
            "pre_accuracy": metrics["pre"]["accuracy"], "post_accuracy": metrics["post"]["accuracy"],
            "pre_cls_macro_f1": metrics["pre_cls"]["macro_f1"], "pre_mean_macro_f1": metrics["pre_mean"]["macro_f1"],
            "pre_pooling": cfg.pre_pooling, "vision_only": vision_only, "device_decoded_images": device_images,
            "processed": processed(sum(len(s) for s in splits.values()), "images")}
