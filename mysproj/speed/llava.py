"""LLaVA's speed paths: the on/off rules and the setup of every one, for evaluation (eval-llava, probe), and FP8 and
compiled layers for fine-tuning. Each is switched on by a field of the stage's config.

Both:
- `fp8`: the language model's frozen Linear layers compute in FP8 (e4m3, rowwise scales; `mysproj.models.fp8`) on
  GPUs with FP8 tensor cores. Results change at FP8's precision, so it is off by default. The LM head, projector
  and vision tower stay as they are: the head decides every prediction and the other two are a small share of
  the work.
- `compile`: `torch.compile` of each decoder layer (and vision encoder layer), compiled once and reused by every
  identical layer; it fuses the norms, rotary embedding and SwiGLU elementwise work around the matmuls. GPUs only.
  Neither applies under ZeRO-3, whose parameter gathering hooks expect the original modules (a warning says so).

Evaluation:
- `precision=auto`: fp16 on GPUs (LLaVA's own inference), fp32 on CPUs; `direct_load`: HF-layout weights read
  straight onto the GPU; the probe's `vision_only`: only the vision tower and projector are loaded.
- `decode=device`: JPEG batches decoded, padded, resized and normalised on the model's device
  (`mysproj.evaluation.device_decode`); `cpu`: PIL and the image processor in the DataLoader workers.
- compiled layers in scoring mode only; `shared_prefix` (scoring): `SharedPrefixForward`; `static_decode`
  (generate): `GreedyDecoder`, with `cuda_graphs` and `compile_prefill` on GPUs.

Fine-tuning (`apply(..., training=True)`, called by `mysproj.training.setup`, which also holds the other
fine-tuning paths: activation checkpointing, `cast_on_gpu`, `shared_prefix`):
- `fp8_backward`: only the input-gradient matmuls through the frozen layers run in FP8 (the forward, and so every
  loss, is the model's own precision).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mysproj.evaluation.batches import image_batches
from mysproj.evaluation.device_decode import DeviceBatches, llava_pixels
from mysproj.evaluation.greedy import GreedyDecoder, unsupported
from mysproj.models.conversation import image_transform
from mysproj.models.fp8 import convert_frozen_linears, fp8_capable
from mysproj.models.loading import load_llava
from mysproj.models.processors import with_backend
from mysproj.models.shared_prefix import SharedPrefixForward
from mysproj.models.vision_only import load_vision

log = logging.getLogger(__name__)
FP8_EXCLUDE = ("lm_head", "multi_modal_projector", "vision_tower")
FP8_MIN_FEATURES = 1024  # below this the per-call quantization passes cost more than the FP8 GEMM saves
ZERO3 = ("zero3", "zero3-offload")


# --------------------------------------------------------------------------------------------------- FP8, compile

def device_name(llava) -> str:
    device = next(llava.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def fp8_supported(llava) -> bool:
    """An A100 would keep an FP8 copy of the weights for nothing; CPUs qualify, which is how tests run the path."""

    device = next(llava.parameters()).device
    return fp8_capable(device.type, device.index)


def apply(llava, *, fp8: bool, compile: bool, sharded: bool = False, training: bool = False,
          fp8_backward: bool = False) -> dict:
    """Apply FP8 and compiled layers to `llava` in place; returns what was done (for logs and metrics). For
    inference (`training=False`) the whole model is frozen first: nothing trains, and FP8 converts frozen layers
    only."""
    done = {"fp8_layers": 0, "compiled_layers": 0}
    fp8_backward = fp8_backward and training and not fp8
    if not (fp8 or fp8_backward or compile):
        return done
    if not training:
        llava.requires_grad_(False)
    if sharded:  # compile is on by default, so only an explicit fp8 request is worth a warning
        (log.warning if fp8 or fp8_backward else log.info)(
            "fp8/compile not applied under ZeRO-3 (parameters are gathered per layer)")
        return done
    if (fp8 or fp8_backward) and not fp8_supported(llava):
        log.warning("fp8 requested, but %s has no FP8 tensor cores (compute capability 8.9+): running the model's "
                    "own precision", device_name(llava))
        fp8 = fp8_backward = False
    if fp8 or fp8_backward:
        trained = [n for n, p in llava.model.language_model.named_parameters() if p.requires_grad]
        if trained:
            log.warning("fp8: %d language-model tensors train (strategy full/lora); only frozen Linear layers "
                        "are converted", len(trained))
        # Inference needs no input gradient, so no transposed copy of the weights.
        done["fp8_layers"] = len(convert_frozen_linears(llava.model.language_model, exclude=FP8_EXCLUDE,
                                                        min_features=FP8_MIN_FEATURES,
                                                        keep_transposed=training, forward_fp8=fp8))
        log.info("fp8: %d frozen language-model Linear layers compute %s in float8_e4m3", done["fp8_layers"],
                 "forward and input gradient" if fp8 else "the input gradient")
    if compile:
        layers = list(llava.model.language_model.layers)
        tower = llava.model.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        layers += list(getattr(encoder, "layers", []))
        for layer in layers:
            layer.compile()
        done["compiled_layers"] = len(layers)
        log.info("compile: %d decoder/encoder layers wrapped in torch.compile (%s)", len(layers),
                 "training" if training else "inference")
    return done


# --------------------------------------------------------------------------------------------------- evaluation

def dtype_for(precision: str, dev: str):
    if precision == "auto":
        return torch.float16 if dev == "cuda" else torch.float32  # fp16 as LLaVA's own inference
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load(cfg, dev: str, *, vision_only: bool = False):
    """The `LoadedLlava` of `cfg.model` on `dev` in `cfg.precision`'s dtype: only its vision tower and projector
    where `vision_only` and the model's output allows it, else the whole model (read straight onto a GPU where
    `cfg.direct_load`)."""

    dtype = dtype_for(cfg.precision, dev)
    loaded = load_vision(cfg.model, device=dev, dtype=dtype) if vision_only else None
    return loaded or load_llava(cfg.model, device=dev, dtype=dtype, direct=cfg.direct_load)


def language_model_skipped(loaded) -> bool:
    """The language model's weights were never loaded (they are on the meta device)."""
    return all(p.is_meta for p in loaded.model.model.language_model.parameters())


def eval_compiles(cfg, dev: str) -> bool:
    """Compiled layers for scoring on a GPU only: generate's decode steps are bound by kernel launches rather than
    arithmetic, and compiled kernels round differently in the last bit, which changes greedy answers; so generate
    stays eager."""
    return cfg.compile and dev == "cuda" and cfg.mode == "scoring"


def prefill_compiles(cfg, dev: str) -> bool:
    """The generate mode's own decoder (`static_decode`) compiles its prefill: on a GPU, where asked."""
    return cfg.mode == "generate" and cfg.static_decode and cfg.compile_prefill and dev == "cuda"


def eval_compile_cache(cfg) -> str | None:
    """`cfg.compile_cache` where an eval-llava run compiles anything (GPUs: scoring's layers, generate's prefill)."""

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compile_cache if eval_compiles(cfg, dev) or prefill_compiles(cfg, dev) else None


def scoring_forward(cfg, model, dev: str):
    """The scoring mode's SharedPrefixForward (`score_continuations(..., fast=)`), or None."""

    if cfg.mode != "scoring" or not cfg.shared_prefix:
        return None
    model.requires_grad_(False)  # evaluation trains nothing; the kept prefix keys and values rely on it
    if not SharedPrefixForward.supports(model):
        return None
    return SharedPrefixForward(model, compile=eval_compiles(cfg, dev))


def greedy_decoder(cfg, model, dev: str, tokenizer):
    """The generate mode's GreedyDecoder (`static_decode`), or None where transformers' generate runs."""

    if cfg.mode != "generate" or not cfg.static_decode:
        return None
    if cfg.temperature > 0:
        log.info("eval-llava: transformers' generate samples (temperature %g)", cfg.temperature)
        return None
    model.requires_grad_(False)  # evaluation trains nothing; the kept prefix keys and values rely on it
    why = unsupported(model)
    if why:
        log.info("eval-llava: transformers' generate decodes (%s)", why)
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GreedyDecoder(model, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_rows=cfg.batch_size,
                         cuda_graphs=cfg.cuda_graphs, compile_prefill=prefill_compiles(cfg, dev))


@dataclass
class EvalPaths:
    """What eval-llava runs with: `fast` for scoring, `decoder` for generate (None: the model's own paths)."""
    layers: dict          # `apply`'s counts: fp8_layers, compiled_layers
    fast: Any = None      # SharedPrefixForward
    decoder: Any = None   # GreedyDecoder

    def summary(self) -> dict:
        """The stage summary's keys for these paths (the decoder's counts as they stand now)."""
        d = self.decoder
        return {"shared_prefix": self.fast is not None,
                **({"static_decode": d.stats, "cuda_graphs": d.cuda_graphs} if d is not None else {})}


def for_eval(cfg, model, tokenizer, dev: str) -> EvalPaths:
    """Apply eval-llava's paths to a loaded `model` in place (FP8, compiled layers) and build its forwards."""
    layers = apply(model, fp8=cfg.fp8, compile=eval_compiles(cfg, dev))
    return EvalPaths(layers, scoring_forward(cfg, model, dev), greedy_decoder(cfg, model, dev, tokenizer))


def pixel_batches(cfg, processor, data, samples, dev: str, dtype):
    """Iterable of (pixels [n, 3, S, S] on `dev` in `dtype`, sample indices) by `cfg.decode`, with the stage's
    `image_backend` and `image_aspect_ratio` applied to the model's image `processor`."""
    processor = with_backend(processor, cfg.image_backend)
    if cfg.decode == "device":
        batches = DeviceBatches(data, samples, llava_pixels(processor, cfg.image_aspect_ratio),
                                batch_size=cfg.batch_size, workers=cfg.workers, device=dev)
    else:
        batches = image_batches(data, samples, image_transform(processor, cfg.image_aspect_ratio), cfg.batch_size,
                                cfg.workers)
    return PixelBatches(batches, dev, dtype)


@dataclass
class PixelBatches:
    """`pixel_batches`' iterable; `device_images` counts the images the device decoded (the rest went through PIL)."""
    batches: Any
    device: str
    dtype: Any

    def __iter__(self):
        for pixels, idx in self.batches:
            yield pixels.to(self.device, self.dtype), idx

    @property
    def device_images(self) -> int:
        return getattr(self.batches, "device_images", 0)
