"""Architecture presets for random-weight LLaVA models (`mysproj model init --preset ...`).

`llava-1.5-7b` is llava-hf/llava-1.5-7b-hf's architecture: CLIP ViT-L/14 at 336 px (576 patch tokens of 1024),
the 2-layer GELU projector 1024 -> 4096 -> 4096 and a 32-layer, 4096-wide Llama (Vicuna-7B v1.5) with the vocabulary
padded to 32064. `tiny` keeps every structural feature at toy sizes so a fine-tune runs in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mysproj.models.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Preset:
    name: str
    vision: dict
    text: dict
    tokenizer_vocab: int  # BPE vocabulary trained for the tokenizer (before the specials)
    vocab_size: int | None = None  # embedding rows; None = tokenizer size padded to a multiple of 64
    extra: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]

    @property
    def image_seq_length(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=14, projection_dim=32, hidden_act="quick_gelu"),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5),
        tokenizer_vocab=1024,
    ),
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        tokenizer_vocab=1024,
        vocab_size=32064,
    ),
}


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for `n` tokens, padded as transformers' LLaVA conversion does (for GPU efficiency)."""
    return (n + multiple - 1) // multiple * multiple


def llava_config(preset: Preset, tokenizer):
    """The `LlavaConfig` of a preset for a given tokenizer (its `<image>`/`<pad>` ids go into the config)."""

    vocab = preset.vocab_size or pad_vocab(len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(f"preset {preset.name}: vocab {vocab} < tokenizer size {len(tokenizer)}")
    text = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **preset.text)
    vision = CLIPVisionConfig(**preset.vision)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                       image_seq_length=preset.image_seq_length, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def image_processor(image_size: int):
    """CLIP preprocessing at `image_size` (resize shortest edge + centre crop, CLIP mean/std), as llava-hf ships."""

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size},
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711],
                              do_convert_rgb=True, resample=3)


def build_random_llava(preset_name: str, seed: int = 0, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer, image_processor) with random weights; `device=None` picks CUDA when available."""

    preset = PRESETS[preset_name]
    tokenizer = build_tokenizer(preset.tokenizer_vocab)
    config = llava_config(preset, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    return model.eval(), tokenizer, image_processor(preset.image_size)
