"""`mysproj bench probe-features`: pre- and post-projection features of JPEG images, decode included.

ours: the probe stage's path per batch: `speed.llava.pixel_batches` (its `decode` field: `cpu`, decode + LLaVA
`pad` preprocessing in DataLoader workers through `PreparedData.open_image`; `--set decode=device`, JPEG batches
decoded, padded and preprocessed on the device) and `stages.probe.image_features` on a random-weight model in the
stage's dtype. One timed step = one batch, wall clock with the GPU drained (decode waits count).
baseline: plain transformers at the same batch size, decoded and preprocessed in the main process:
`open_rgb` + `expand2square` + the CLIP image processor, then `model.model.get_image_features`, bf16.
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from mysproj.bench import flops as F
from mysproj.bench import synthetic
from mysproj.bench.command import ours_config
from mysproj.bench.eval_clip import synthetic_prepared
from mysproj.bench.measurement import BenchReport, Measurement, card_name
from mysproj.bench.timing import free_memory, time_steps
from mysproj.data.images import expand2square, open_rgb
from mysproj.models.presets import build_random_llava
from mysproj.speed.llava import dtype_for, pixel_batches
from mysproj.stages import probe

log = logging.getLogger("mysproj.bench")
UNIQUE_IMAGES = 256


def build_model(args, dtype):
    model, _, processor = build_random_llava(args.preset, seed=args.seed, dtype=str(dtype).split(".")[-1],
                                             device=args.device)
    return model.eval(), processor


def run(args) -> BenchReport:
    workers = os.cpu_count() or 1
    dtype = dtype_for("auto", args.device)
    with tempfile.TemporaryDirectory(prefix="mysproj-bench-probe-") as tmp:
        n = args.batch_size * (args.warmup + args.steps + (1 if args.profile else 0))
        paths = synthetic.write_jpegs(tmp, min(UNIQUE_IMAGES, n), *args.image_wh, seed=args.seed)
        model, processor = build_model(args, dtype)
        dims = F.LlavaDims.from_config(model.config)
        flops = F.probe_features(dims)
        cfg = ours_config("probe", {"model": "bench:random", "data": "bench:synthetic", "out": "bench:none",
                                    "batch_size": args.batch_size, "workers": workers}, args)
        measurements = [_ours(args, cfg, model, processor, paths, n)]
        del model
        free_memory(args.device)
        if args.baseline:
            measurements.append(_baseline(args, paths))
            free_memory(args.device)
    for m in measurements:
        m.flops_per_item = flops["total"]
    settings = {"image_px": args.image_px, "decode_workers": workers, "dtype": str(dtype).split(".")[-1],
                "decode": cfg.decode, "overrides": dict(args.set or [])}
    return BenchReport("probe-features", args.preset, args.device, card_name(args.device), args.peak_tflops,
                       settings, flops, measurements)


def _ours(args, cfg, model, processor, paths, n: int) -> Measurement:
    data, samples = synthetic_prepared(paths, n)
    batches = pixel_batches(cfg, processor, data, samples, args.device, model.dtype)
    pixel_iter = iter(batches)
    shapes = []

    def step(_):
        pixels, _idx = next(pixel_iter)
        pre, post = probe.image_features(model, pixels)
        shapes.append((tuple(pre.shape), tuple(post.shape)))

    timing = time_steps(step, device=args.device, warmup=args.warmup, steps=args.steps, clock="wall",
                        profile=args.profile)
    return Measurement("ours", f"stage probe.image_features, decode {cfg.decode}, {cfg.workers} decode workers",
                       args.batch_size, args.batch_size, timing, 0.0, unit="images",
                       extra={"pre_shape": list(shapes[-1][0]), "post_shape": list(shapes[-1][1]),
                              "device_decoded_images": batches.device_images})


def _baseline(args, paths) -> Measurement:
    model, processor = build_model(args, torch.bfloat16 if args.device == "cuda" else torch.float32)
    cfg = model.config
    background = tuple(int(x * 255) for x in processor.image_mean)

    def step(i):
        files = [paths[(i * args.batch_size + j) % len(paths)] for j in range(args.batch_size)]
        images = [expand2square(open_rgb(f), background) for f in files]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(args.device, model.dtype)
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            post = torch.stack([f.mean(dim=0) for f in out.pooler_output])
            pre = out.hidden_states[cfg.vision_feature_layer][:, 1:].mean(dim=1)
        return pre, post

    timing = time_steps(step, device=args.device, warmup=min(args.warmup, 2), steps=args.steps, clock="wall")
    return Measurement("baseline", "transformers get_image_features, decode + preprocess in the main process, "
                       f"{str(processor.__class__.__name__)}", args.batch_size, args.batch_size, timing, 0.0,
                       unit="images")
