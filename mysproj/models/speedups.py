"""Opt-in speed paths for a loaded LlavaForConditionalGeneration (fine-tuning and evaluation), one switch each:

- `fp8`: the language model's frozen Linear layers compute in FP8 (e4m3, rowwise scales; `mysproj.models.fp8`),
  about twice the bf16 tensor-core rate on Hopper. Results change at FP8's precision (docs/performance.md),
  so it is off by default. The LM head, projector and vision tower stay as they are: the head decides every
  prediction and the other two are a few % of the work.
- `fp8_backward` (training): only the input-gradient matmuls through the frozen layers run in FP8; the forward,
  and so every loss, is the model's own precision.
- `compile`: `torch.compile` of each decoder layer (and vision encoder layer), compiled once and reused by all 32
  identical layers; fuses the norms, rotary embedding and SwiGLU elementwise work around the matmuls.

Neither applies under ZeRO-3, whose parameter gathering hooks expect the original modules (a warning says so).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
FP8_EXCLUDE = ("lm_head", "multi_modal_projector", "vision_tower")
FP8_MIN_FEATURES = 1024  # below this the per-call quantization passes cost more than the FP8 GEMM saves


def device_name(llava) -> str:
    import torch

    device = next(llava.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def fp8_supported(llava) -> bool:
    """An A100 would keep an FP8 copy of the weights for nothing; CPUs qualify, which is how tests run the path."""
    from mysproj.models.fp8 import fp8_capable

    device = next(llava.parameters()).device
    return fp8_capable(device.type, device.index)


def apply(llava, *, fp8: bool, compile: bool, sharded: bool = False, training: bool = False,
          fp8_backward: bool = False) -> dict:
    """Apply the requested paths to `llava` in place; returns what was done (for logs and metrics). For inference
    (`training=False`) the whole model is frozen first: nothing trains, and FP8 converts frozen layers only."""
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
        log.warning("fp8 requested, but %s has no FP8 tensor cores (compute capability 8.9+, e.g. H100/L4): "
                    "running the model's own precision", device_name(llava))
        fp8 = fp8_backward = False
    if fp8 or fp8_backward:
        from mysproj.models.fp8 import convert_frozen_linears

        trained = [n for n, p in llava.model.language_model.named_parameters() if p.requires_grad]
        if trained:
            log.warning("fp8: %d language-model tensors train (strategy full/lora); only frozen Linear layers "
                        "are converted", len(trained))
        # Inference needs no input gradient, so no transposed copy (1 byte a weight instead of 2).
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
