"""Synthetic inputs of the shapes the benchmarks fix: random RGB images (real JPEG bytes where decode is measured)
and token sequences laid out like the project's prompts (system prompt, image, question, answer).

Token layouts use random ids of exact lengths rather than tokenised text, so the measured shape does not drift
with the tokenizer: LLaVA's llava_v1 system prompt and "USER:" come before the image (~35 Vicuna tokens), the
classification question after it, and the answer (label + `</s>`) last.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

TEXT_BEFORE_IMAGE = 35  # "<s> A chat between ... questions. USER:" in Vicuna's tokenizer


@dataclass(frozen=True)
class TokenLayout:
    """Text tokens of one example around the image; the image tokens come from the model config."""
    before_image: int
    after_image: int
    answer: int = 0      # supervised tokens at the end of `after_image` (training only)

    @property
    def text(self) -> int:
        return self.before_image + self.after_image

    @classmethod
    def with_text(cls, text_tokens: int, answer: int = 0) -> TokenLayout:
        before = min(TEXT_BEFORE_IMAGE, max(text_tokens - answer - 1, 1))
        return cls(before, text_tokens - before, answer)


def rng(seed: int):
    return np.random.default_rng(seed)


def random_images(n: int, width: int, height: int, seed: int = 0) -> list:
    """`n` PIL RGB images of smooth random colour fields plus noise (JPEG-compressible like photos, so encoded
    sizes and decode cost are realistic; pure noise would be several times larger)."""

    g = rng(seed)
    images = []
    for _ in range(n):
        coarse = g.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        noise = g.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def jpeg_bytes(images, quality: int = 90) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_jpegs(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """`n` JPEG files under `folder` (the paths the released code's pipeline call and the stage's decoder read)."""

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, data in enumerate(jpeg_bytes(random_images(n, width, height, seed))):
        path = os.path.join(folder, f"img{i:05d}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def token_batch(config, layout: TokenLayout, batch: int, seed: int = 0, *, labels: bool = False):
    """`input_ids` [batch, T] (T = text + image tokens) with the image placeholder repeated `image_seq_length`
    times after `layout.before_image` text tokens (the same in every row and every batch: one system prompt), an
    all-ones `attention_mask` and, with `labels`, labels that supervise only the last `layout.answer` tokens
    (-100 elsewhere, as the training collator masks the prompt)."""

    text_cfg = config.text_config
    image_id = config.image_token_index
    n_image = config.image_seq_length
    specials = {image_id, text_cfg.pad_token_id, text_cfg.bos_token_id, text_cfg.eos_token_id, config.pad_token_id}
    g = torch.Generator().manual_seed(seed)
    # Draw from ordinary tokens only: below the first special id above the reserved <unk>/<s>/</s>.
    high = min(i for i in specials if i is not None and i > 2)
    text = torch.randint(3, high, (batch, layout.text), generator=g)
    # one system prompt for every example of every batch, whatever the seed, as in real llava_v1 data
    text[:, :layout.before_image] = torch.randint(3, high, (layout.before_image,),
                                                  generator=torch.Generator().manual_seed(0))
    text[:, 0] = text_cfg.bos_token_id
    image = torch.full((batch, n_image), image_id)
    ids = torch.cat([text[:, :layout.before_image], image, text[:, layout.before_image:]], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        lab = torch.full_like(ids, -100)
        if layout.answer:
            lab[:, -layout.answer:] = ids[:, -layout.answer:]
            lab[:, -1] = text_cfg.eos_token_id
            ids[:, -1] = text_cfg.eos_token_id
        out["labels"] = lab
    return out


def pixel_batch(config, batch: int, seed: int = 0, dtype=None):
    """Normalised pixel values [batch, 3, S, S] as the CLIP processor would give (for steps that do not measure
    decode: the training step and the eval batch function receive preprocessed tensors from their loaders)."""

    size = config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).clamp_(-1.8, 2.2).to(dtype or torch.float32)
