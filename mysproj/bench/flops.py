"""Model FLOPs of the benchmarked work, for MFU = (model FLOPs per item x items/s) / peak FLOP/s.

"Model FLOPs" are the matmul FLOPs the *work* needs, whatever the implementation does: recomputation under
activation checkpointing, logits nobody reads, the vision layer after the one LLaVA uses, or gradients into frozen
weights are not counted. Ours and the baseline are charged the same FLOPs per item, so their MFU ratio equals
their throughput ratio. A matmul of an [n, a] by [a, b] costs 2nab; norms, activations, softmax, embeddings
lookups and the optimizer are elementwise and left out (<1% here). The formulas, with their numbers for
LLaVA-1.5-7B, are written out in `docs/performance.md`.

Symbols (per layer, counting weight matrices only, biases ignored):
  vision (CLIP ViT):  Pv = 4 w^2 + 2 w f           over Tv = (S/p)^2 + 1 tokens, Lv' = layers actually used
  projector:          P1 = w d,  P2 = d^2           over I = (S/p)^2 image tokens
  LLM (Llama):        Pt = 2 d q + 2 d kv + 3 d F   over T tokens, L layers; lm_head Ph = d V
  attention, fwd:     4 q ctx per query token and layer (QK^T and PV), causal: query i sees i keys.
Training per sample (I image tokens at positions [b, b+I), T tokens, Y supervised tokens):
  vision  fwd only (frozen):                       2 Pv Tv Lv' + 4 w Tv^2 Lv' + 2 (3 p^2) w I
  projector fwd + weight grads + input grad of linear_2 only (linear_1's input is the frozen tower's):
                                                   I (2 (P1+P2) + 2 (P1+P2) + 2 P2)
  LLM fwd:                                         2 Pt L T + A(T) + 2 Ph Y      (logits only where labels are)
  projector strategy: input grads only, only from the first image position on (nothing before it depends on
  the projector), no weight grads:                 2 Pt L (T-b) + 2 A_b(T) + 2 Ph Y
  full strategy: input and weight grads:           4 Pt L T + 2 A(T) + 4 Ph Y
where A(T) = 4 q L T(T+1)/2 is the causal attention forward and A_b(T) its part for query positions >= b.
"""

from __future__ import annotations

from dataclasses import dataclass

# The per-card bf16 dense-matmul peak MFU is charged against: a Hopper card's ceiling as `mysproj bench` measures
# it (docs/performance.md); override with --peak-tflops.
DEFAULT_PEAK_TFLOPS = 790.0


@dataclass(frozen=True)
class LlavaDims:
    vision_width: int
    vision_mlp: int
    vision_layers_used: int
    patch: int
    image_size: int
    text_width: int
    text_mlp: int
    text_layers: int
    q_width: int
    kv_width: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> LlavaDims:
        """From a transformers `LlavaConfig`; the layers used follow `vision_feature_layer` (-2 -> all but one)."""
        v, t = config.vision_config, config.text_config
        layer = config.vision_feature_layer
        layer = max(layer) if isinstance(layer, (list, tuple)) else layer
        # hidden_states[0] is the embedding output, so index k needs k layers; -k needs L + 1 - k.
        used = layer if layer >= 0 else v.num_hidden_layers + 1 + layer
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        n_kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        return cls(vision_width=v.hidden_size, vision_mlp=v.intermediate_size, vision_layers_used=used,
                   patch=v.patch_size, image_size=v.image_size, text_width=t.hidden_size,
                   text_mlp=t.intermediate_size, text_layers=t.num_hidden_layers,
                   q_width=t.num_attention_heads * head_dim, kv_width=n_kv * head_dim, vocab=t.vocab_size)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def text_layer_params(self) -> int:
        d = self.text_width
        return 2 * d * self.q_width + 2 * d * self.kv_width + 3 * d * self.text_mlp


def vit_forward(width: int, mlp: int, layers: int, patch: int, image_size: int, cls_token: bool = True) -> float:
    """One image through a ViT's patch embedding and `layers` encoder layers (bidirectional attention)."""
    patches = (image_size // patch) ** 2
    tokens = patches + (1 if cls_token else 0)
    per_layer = 2 * (4 * width**2 + 2 * width * mlp) * tokens + 4 * width * tokens**2
    return 2 * 3 * patch**2 * width * patches + layers * per_layer


def causal_attention(dims: LlavaDims, n_new: int, n_past: int = 0, from_position: int = 0) -> float:
    """Forward attention matmuls for `n_new` query tokens after `n_past` cached ones; only queries at absolute
    positions >= `from_position` are counted (for backward passes that start at the image)."""
    first = max(from_position, n_past)
    last = n_past + n_new                       # query at absolute position i (0-based) sees i + 1 keys
    keys = (last * (last + 1) - first * (first + 1)) // 2 if last > first else 0
    return 4 * dims.q_width * dims.text_layers * keys


def vision_and_projector_forward(dims: LlavaDims) -> dict:
    vision = vit_forward(dims.vision_width, dims.vision_mlp, dims.vision_layers_used, dims.patch, dims.image_size)
    projector = 2 * (dims.vision_width * dims.text_width + dims.text_width**2) * dims.image_tokens
    return {"vision": vision, "projector": projector}


def llava_train_step(dims: LlavaDims, *, strategy: str, text_before_image: int, text_after_image: int,
                     label_tokens: int) -> dict:
    """Model FLOPs of one training sample (see the module docstring); returns the parts and `total`."""
    if strategy not in ("projector", "full"):
        raise ValueError(f"strategy {strategy!r}: projector or full")
    image = dims.image_tokens
    tokens = text_before_image + image + text_after_image
    p1, p2 = dims.vision_width * dims.text_width, dims.text_width**2
    body = dims.text_layer_params * dims.text_layers
    head = dims.text_width * dims.vocab
    parts = vision_and_projector_forward(dims)
    parts["projector"] = image * (2 * (p1 + p2) + 2 * (p1 + p2) + 2 * p2)
    attn = causal_attention(dims, tokens)
    if strategy == "projector":
        b = text_before_image
        parts["llm"] = 2 * body * tokens + 2 * body * (tokens - b)
        parts["attention"] = attn + 2 * causal_attention(dims, tokens, from_position=b)
        parts["lm_head"] = 4 * head * label_tokens
    else:
        parts["llm"] = 6 * body * tokens
        parts["attention"] = 3 * attn
        parts["lm_head"] = 6 * head * label_tokens
    parts["total"] = sum(parts.values())
    return parts


def llava_generate(dims: LlavaDims, *, prompt_text_tokens: int, new_tokens: int) -> dict:
    """One image, greedy decoding with a KV cache: a prefill of the image + prompt (logits at its last position
    give the first token), then `new_tokens - 1` single-token steps."""
    prompt = dims.image_tokens + prompt_text_tokens
    body = dims.text_layer_params * dims.text_layers
    head = dims.text_width * dims.vocab
    parts = vision_and_projector_forward(dims)
    steps = max(new_tokens - 1, 0)
    parts["llm"] = 2 * body * (prompt + steps)
    parts["attention"] = causal_attention(dims, prompt) + causal_attention(dims, steps, n_past=prompt)
    parts["lm_head"] = 2 * head * new_tokens
    parts["total"] = sum(parts.values())
    return parts


def llava_scoring(dims: LlavaDims, *, prompt_text_tokens: int, n_classes: int, label_tokens: int) -> dict:
    """One image scored against `n_classes` label continuations of `label_tokens` each: one prefill of the shared
    prompt, then each continuation, fed whole (`</s>` included), attends to it; logits at every continuation
    position. A fixed definition of the work, so MFU compares implementations: one that re-runs the prompt per
    class is charged the same, and `score_continuations`, which does not feed the final `</s>`s (nothing after
    them is scored), does a little less than charged."""
    prompt = dims.image_tokens + prompt_text_tokens
    body = dims.text_layer_params * dims.text_layers
    head = dims.text_width * dims.vocab
    parts = vision_and_projector_forward(dims)
    parts["llm"] = 2 * body * (prompt + n_classes * label_tokens)
    parts["attention"] = (causal_attention(dims, prompt)
                          + n_classes * causal_attention(dims, label_tokens, n_past=prompt))
    parts["lm_head"] = 2 * head * n_classes * label_tokens
    parts["total"] = sum(parts.values())
    return parts


def probe_features(dims: LlavaDims) -> dict:
    """Pre-projection (layer -2 patches) and post-projection (projector output) features of one image."""
    parts = vision_and_projector_forward(dims)
    parts["total"] = sum(parts.values())
    return parts


def clip_zero_shot_image(width: int, mlp: int, layers: int, patch: int, image_size: int, embed_dim: int,
                         n_classes: int) -> dict:
    """One image through the whole CLIP image tower, its projection and the similarity to `n_classes` cached text
    embeddings. The class prompts' text encoding is needed once per run, not per image, and is left out."""
    parts = {"vision": vit_forward(width, mlp, layers, patch, image_size),
             "projection": 2 * width * embed_dim, "similarity": 2 * embed_dim * n_classes}
    parts["total"] = sum(parts.values())
    return parts


def mfu(flops_per_item: float, items_per_s: float, peak_tflops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation in [0, 1] of `n_devices` cards of `peak_tflops` each."""
    return flops_per_item * items_per_s / (peak_tflops * 1e12 * n_devices)
