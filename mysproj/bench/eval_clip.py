"""`mysproj bench eval-clip`: CLIP zero-shot classification including JPEG decode.

ours: the eval-clip stage's path: random weights written by the `model-init` stage, `load_clip`, the stage's
class embeddings, image tower preparation (`--set precision=bf16`, `--set compile=true`), batches by the stage's
`decode` field (`cpu`: PIL in DataLoader workers through `PreparedData.open_image`; `--set decode=device`: the
workers read sha256-verified bytes and the batch is decoded and preprocessed on the device) and the stage's
pipelined loop (`zero_shot_probs`: batch k encodes while batch k+1 decodes). One timed step = one batch: the
wall-clock interval between consecutive results, the GPU drained before the first timed step and after the last
(`time_steps(clock="pipelined")`), so decode waits count and the overlap the stage gets is kept.
baseline: the released code's `zero_shot_inference.py`: transformers' `zero-shot-image-classification` pipeline on a
`CLIPModel` of the same architecture, called once per image file with the class names (class prompts re-encoded
every call), fp32 as the pipeline defaults; one timed step = one image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, pipeline

from mysproj.bench import flops as F
from mysproj.bench import synthetic
from mysproj.bench.command import ours_config
from mysproj.bench.measurement import BenchReport, Measurement, card_name
from mysproj.bench.timing import free_memory, time_steps
from mysproj.config.stages import ModelInitConfig
from mysproj.data.prepared import PreparedData, Sample
from mysproj.models.clip import load_clip
from mysproj.speed import clip as speed
from mysproj.stages import eval_clip, model_init

log = logging.getLogger("mysproj.bench")
CLIP_PRESET = {"tiny": "clip-tiny", "llava-1.5-7b": "clip-vit-l-14-336"}
UNIQUE_IMAGES = 256  # distinct files; longer runs cycle through them (decode cost per image is the same)


# DTD's 47 classes: real label lengths for the class prompts and the scoring continuations.
DTD_CLASSES = ("banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted "
               "fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined "
               "marbled matted meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared "
               "spiralled sprinkled stained stratified striped studded swirly veined waffled woven wrinkled "
               "zigzagged").split()


def class_names(n: int) -> list[str]:
    """`n` distinct class names: DTD's, then numbered repeats of them."""
    return [DTD_CLASSES[i % 47] + (f" {i // 47}" if i >= 47 else "") for i in range(n)]


def run(args) -> BenchReport:
    preset = CLIP_PRESET[args.preset]
    workers = os.cpu_count() if args.workers is None else args.workers
    names = class_names(args.classes)
    with tempfile.TemporaryDirectory(prefix="mysproj-bench-clip-") as tmp:
        n_files = min(UNIQUE_IMAGES, args.batch_size * (args.warmup + args.steps))
        paths = synthetic.write_jpegs(os.path.join(tmp, "images"), n_files, *args.image_wh, seed=args.seed)
        model_dir = _random_clip(preset, os.path.join(tmp, "model"), args.seed)
        clip, cfg, ours = _ours(args, model_dir, paths, names, workers)
        arch = open_clip_dims(clip.model)
        hf_config = hf_clip_config(arch, clip.model)
        flops = F.clip_zero_shot_image(**arch, n_classes=len(names))
        ours.flops_per_item = flops["total"]
        dtype = str(next(clip.model.visual.parameters()).dtype).split(".")[-1]
        report = BenchReport("eval-clip", args.preset, args.device, card_name(args.device), args.peak_tflops,
                             {"clip_preset": preset, "classes": len(names), "image_px": args.image_px,
                              "decode_workers": cfg.workers, "dtype": dtype, "decode": cfg.decode,
                              "precision": cfg.precision, "compile": cfg.compile, "fast_tower": cfg.fast_tower,
                              "overrides": dict(args.set or [])}, flops, [ours])
        del clip
        free_memory(args.device)
        if args.baseline:
            baseline = _baseline(args, hf_config, paths, names)
            free_memory(args.device)
            baseline.flops_per_item = flops["total"]
            report.measurements.append(baseline)
    return report


def _random_clip(preset: str, out_dir: str, seed: int) -> str:
    """The `model-init` stage's random CLIP, written where `load_clip` reads stage outputs."""

    model_init.run(ModelInitConfig(preset=preset, out=out_dir, seed=seed))
    return out_dir


def synthetic_prepared(paths: list[str], n: int):
    """(`PreparedData`, `n` samples cycling over local JPEG files) without a prep output: the reader's own
    `open_image`/`local_image` (fetch with sha256 verification, then `open_rgb`) decode them."""

    data = PreparedData.__new__(PreparedData)  # no prep output behind it; only the decode methods are used
    data.classes, data.task, data.dataset, data._table = [], "synthetic", "synthetic", None
    shas = []
    for path in paths:
        with open(path, "rb") as f:
            shas.append(hashlib.sha256(f.read()).hexdigest())
    samples = [Sample(paths[i % len(paths)], "x", 0, shas[i % len(paths)], "test") for i in range(n)]
    return data, samples


def _ours(args, model_dir: str, paths: list[str], names: list[str], workers: int):
    n = args.batch_size * (args.warmup + args.steps + (1 if args.profile else 0))
    cfg = ours_config("eval-clip", {"model": model_dir, "data": "bench:synthetic", "out": "bench:none",
                                    "batch_size": args.batch_size, "workers": workers}, args)
    clip = load_clip(model_dir, device=args.device)
    text = eval_clip.class_embeddings(clip, names, "paper", args.device)
    tower = speed.image_tower(clip, cfg)
    # One batch more than is timed: the loop's last result needs no decode, which would flatter the last step.
    data, samples = synthetic_prepared(paths, n + args.batch_size)
    batches = speed.pixel_batches(clip, data, samples, cfg, args.device)
    results = eval_clip.zero_shot_probs(text, batches, tower)
    seen = []

    def step(_):
        probs, _idx = next(results)
        seen.append(probs.shape[0])

    timing = time_steps(step, device=args.device, warmup=args.warmup, steps=args.steps, clock="pipelined",
                        profile=args.profile)
    results.close()
    if sum(seen) != n:
        raise RuntimeError(f"eval-clip bench: {sum(seen)} images classified, expected {n}")
    m = Measurement("ours", f"stage eval-clip ({clip.kind}), {speed.describe(cfg, tower)}, {cfg.workers} decode "
                    "workers", args.batch_size, args.batch_size,
                    timing, 0.0, unit="images",
                    extra={"device_decoded_images": getattr(batches, "device_images", 0)})
    return clip, cfg, m


def open_clip_dims(model) -> dict:
    """Image-tower dimensions of an open_clip CLIP (or the HF adapter) for the FLOP model."""
    if hasattr(model, "visual"):
        v = model.visual
        block = v.transformer.resblocks[0]
        size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
        return {"width": v.conv1.out_channels, "mlp": block.mlp.c_fc.out_features,
                "layers": len(v.transformer.resblocks), "patch": v.conv1.kernel_size[0], "image_size": size,
                "embed_dim": v.output_dim}
    c = model.model.config
    return {"width": c.vision_config.hidden_size, "mlp": c.vision_config.intermediate_size,
            "layers": c.vision_config.num_hidden_layers, "patch": c.vision_config.patch_size,
            "image_size": c.vision_config.image_size, "embed_dim": c.projection_dim}


def hf_clip_tokenizer():
    """transformers' CLIPTokenizer over open_clip's shipped BPE vocabulary (OpenAI CLIP's; no hub needed)."""
    from open_clip.tokenizer import SimpleTokenizer  # noqa: PLC0415 - open_clip imports wandb (where installed) when imported: only where it is used

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def hf_clip_config(arch: dict, clip_model):
    """A transformers `CLIPConfig` of the same architecture as the open_clip model (text tower included)."""

    text = clip_model.transformer if hasattr(clip_model, "transformer") else None
    t_width = text.width if text is not None else 768
    t_layers = len(text.resblocks) if text is not None else 12
    t_heads = text.resblocks[0].attn.num_heads if text is not None else 12
    return CLIPConfig(
        text_config=dict(hidden_size=t_width, intermediate_size=4 * t_width, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, max_position_embeddings=77, vocab_size=49408,
                         hidden_act="gelu"),
        vision_config=dict(hidden_size=arch["width"], intermediate_size=arch["mlp"], num_hidden_layers=arch["layers"],
                           num_attention_heads=max(arch["width"] // 64, 1), image_size=arch["image_size"],
                           patch_size=arch["patch"], hidden_act="gelu"),
        projection_dim=arch["embed_dim"])


def _baseline(args, config, paths: list[str], names: list[str]) -> Measurement:
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = CLIPModel(config).eval()
    size = config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    classify = pipeline("zero-shot-image-classification", model=model, tokenizer=hf_clip_tokenizer(),
                        image_processor=processor, device=args.device)
    n = args.baseline_images or max(32, 2 * args.batch_size)
    results = []

    def step(i):
        results.append(classify(paths[i % len(paths)], candidate_labels=names))

    warm = min(args.warmup, 3)
    timing = time_steps(step, device=args.device, warmup=warm, steps=n, clock="wall")
    if len(results) != warm + n or len(results[-1]) != len(names):
        raise RuntimeError("eval-clip baseline: the pipeline returned unexpected results")
    return Measurement("baseline", "transformers pipeline('zero-shot-image-classification'), one image per call "
                       "(the released zero_shot_inference.py), fp32", 1, 1, timing, 0.0, unit="images")
