"""Which implementation of the CLIP image processor prepares LLaVA's images (`image_backend`).

transformers 5's `CLIPImageProcessor` resizes with torchvision; the transformers the released code pinned (4.37)
resized with PIL, which `CLIPImageProcessorPil` still does. Same sizes, mean and std; the pixels differ by up to
a level or two of 255 after resizing. `torchvision` keeps the loaded processor; `pil` rebuilds it from the same
settings on the PIL implementation.
"""

from __future__ import annotations

from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from mysproj.errors import BadInput


def with_backend(processor, backend: str):
    """`processor` itself, or (`pil`) a `CLIPImageProcessorPil` with its settings."""
    if backend == "torchvision":
        return processor

    if isinstance(processor, CLIPImageProcessorPil):
        return processor
    if not isinstance(processor, CLIPImageProcessor):
        raise BadInput(f"image_backend=pil: the model's image processor is a {type(processor).__name__}, not a "
                       f"CLIPImageProcessor; use image_backend=torchvision")
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return CLIPImageProcessorPil(**settings)
