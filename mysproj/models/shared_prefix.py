"""LLaVA logits through a frozen LLM without the work whose result nothing reads: projector-only training
(`training/loss.py`) and class scoring (`evaluation/scoring.py`).

- **The shared prefix.** Every v1 example (vicuna_v1 in training, llava_v1 in evaluation) starts with the same
  tokens before its image (the system prompt and "USER:", 35 of 640). With the LLM frozen nothing in them
  changes, yet the model computes them for every row of every batch (and training back-propagates through them).
  Here their keys and values are computed once per run, at batch 1, without gradient, and the rows from the image
  on attend to them.
- **The last layer.** Its output is read only at the positions whose logits are used (the answer, ~5 of 640 in
  training; the scored rows in scoring). It still needs keys and values everywhere (those queries attend to
  them), but its queries, attention output and MLP run at the kept positions only.
- **The vision tower** runs up to the layer LLaVA reads (-2: 23 of 24), as one function, with no hooks collecting
  every layer's output.

The mathematics is the model's own, so losses, gradients and scores equal the plain forward's within rounding
(the CPU tests check it in fp32). It applies when the batch allows: every row shares the tokens before one
common first image position, unpadded there, and rows are right-padded (a causal row never sees the padding
after it, so training needs no mask; scoring passes its own); otherwise `SharedPrefixForward.prefix` returns 0
and the caller runs the model as usual.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half


def prefix_length(input_ids, attention_mask, image_token_id: int) -> int:
    """Tokens before the first image position when every row shares them and rows are right-padded (or not padded),
    else 0. On the CPU copy of a training batch it costs no device synchronisation."""
    is_image = input_ids == image_token_id
    if input_ids.shape[1] < 2 or not bool(is_image.any(-1).all()):
        return 0
    first = is_image.int().argmax(-1)
    p = int(first[0])
    mask = attention_mask.bool()
    if p == 0 or not bool((first == p).all()) or not bool((input_ids[:, :p] == input_ids[:1, :p]).all()):
        return 0
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())
    return p if right_padded else 0


def _rope(x, cos, sin):
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _heads(y, head_dim: int):
    """[B, N, H * D] -> [B, H, N, D]."""
    return y.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _qkv(attn, x, parts: str = "qkv"):
    """The requested projections of `x` as [B, H, N, D] each."""
    return [_heads(getattr(attn, f"{p}_proj")(x), attn.head_dim) for p in parts]


def _with_past(past, new):
    """[1, H, P, D] cached prefix + [B, H, N, D] -> [B, H, P + N, D]."""
    return new if past is None else torch.cat([past.expand(new.shape[0], -1, -1, -1), new], dim=2)


def layer_step(layer, h, cos, sin, past_k=None, past_v=None, mask=None):
    """One LlamaDecoderLayer over rows `h` [B, N, d] that follow a cached prefix (past_k/v [1, H, P, D] or None);
    returns (h out, this layer's k, v for these rows). cos/sin: [1 or B, N, D] at the rows' positions. `mask`:
    None (causal) or an additive [B, 1, N, P + N] mask (scoring's).

    Causal without a mask, the queries are prepended with P zero rows so the attention is the plain top-left
    causal kernel (the fastest SDPA path; a prefix needs bottom-right alignment otherwise), and those rows'
    outputs are dropped."""
    attn = layer.self_attn
    q, k, v = _qkv(attn, layer.input_layernorm(h))
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    p = 0 if past_k is None or mask is not None else past_k.shape[2]
    if p:
        q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], p, q.shape[3]), q], dim=2)
    groups = attn.num_key_value_groups
    o = F.scaled_dot_product_attention(q, repeat_kv(_with_past(past_k, k), groups),
                                       repeat_kv(_with_past(past_v, v), groups), attn_mask=mask,
                                       is_causal=mask is None, scale=attn.scaling)[:, :, p:]
    h = h + attn.o_proj(o.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), k, v


def last_layer_rows(layer, h, cos, sin, past_k, past_v, rows, mask=None, return_kv: bool = False):
    """The last decoder layer's output at `rows` only ([B, R, d]; indices into h's N rows, sorted): keys and values
    for every row, queries, attention output and MLP at `rows`. `mask` as in `layer_step`. `return_kv`: also the
    keys and values ([B, H, P + N, D], the prefix's included), for a cache."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k, v = _qkv(attn, x, "kv")
    k, v = _with_past(past_k, _rope(k, cos, sin)), _with_past(past_v, v)
    q = _rope(_qkv(attn, x[:, rows], "q")[0], cos[:, rows], sin[:, rows])
    p = 0 if past_k is None else past_k.shape[2]
    if mask is None:
        visible = torch.arange(k.shape[2], device=h.device)[None, :] <= (rows + p)[:, None]   # causal, [R, P + N]
    else:
        visible = mask[:, :, rows]
    groups = attn.num_key_value_groups
    o = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=visible,
                                       scale=attn.scaling)
    out = h[:, rows] + attn.o_proj(o.transpose(1, 2).reshape(h.shape[0], len(rows), -1))
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    return (out, k, v) if return_kv else out


def cached_layer_step(layer, h, cos, sin, cache_k, cache_v, slot, visible):
    """One LlamaDecoderLayer over one new token a row (`h` [B, 1, d]) against a cache of fixed size: its key and
    value are written in place at cache slot `slot` ([1] long, the same for every row), and it attends to the slots
    `visible` marks ([B, 1, 1, S] bool). Nothing is concatenated and no shape depends on the step, so a decode step
    made of these can be recorded once as a CUDA graph."""
    attn = layer.self_attn
    q, k, v = _qkv(attn, layer.input_layernorm(h))
    cache_k.index_copy_(2, slot, _rope(k, cos, sin))
    cache_v.index_copy_(2, slot, v)
    groups = attn.num_key_value_groups
    o = F.scaled_dot_product_attention(_rope(q, cos, sin), repeat_kv(cache_k, groups), repeat_kv(cache_v, groups),
                                       attn_mask=visible, scale=attn.scaling)
    h = h + attn.o_proj(o.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def tower_features(tower, pixel_values, n_layers: int, drop_cls: bool):
    """LLaVA's image features from a frozen CLIPVisionModel: embeddings, pre-norm and the first `n_layers` encoder
    layers, without the hooks that collect every layer's output. Never compiled as a whole: its 23 layers would
    unroll into one graph whose compile costs far more of a run's start than it saves; each layer's own compiled
    forward serves it where the caller compiled the layers (`mysproj.speed.llava.apply`)."""
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in tower.encoder.layers[:n_layers]:
            h = layer(h, None)
    return h[:, 1:] if drop_cls else h


def tower_layers_used(llava) -> int | None:
    """Encoder layers up to LLaVA's feature layer, or None where `tower_features` does not apply."""
    tower, cfg = llava.model.vision_tower, llava.config
    layer = cfg.vision_feature_layer
    if not all(hasattr(tower, a) for a in ("embeddings", "pre_layrnorm", "encoder")) or not isinstance(layer, int):
        return None
    n = len(tower.encoder.layers)
    return n + 1 + layer if layer < 0 else layer  # hidden_states[k] is the output of the first k layers


def _compiled(fn, **dynamic):
    """`torch.compile(fn)`, called with the dimensions `dynamic` names ({argument: dims}) marked dynamic. Batch
    sizes, row counts and lengths differ from call to call (the answers' lengths, a run's last batch); left to
    itself, torch.compile compiles each function for the first call's sizes and again, with symbolic sizes, at the
    first change: a second compile of every graph (forward and backward). Marked, each compiles once. A dimension
    of size 1 stays specialised, as torch.compile does anyway."""
    compiled = torch.compile(fn)
    signature = inspect.signature(fn)

    def call(*args, **kwargs):
        for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
            if name in dynamic and isinstance(value, torch.Tensor):
                for dim in dynamic[name]:
                    torch._dynamo.maybe_mark_dynamic(value, dim)
        return compiled(*args, **kwargs)
    return call


class SharedPrefixForward:
    """`logits(...)` = the LlavaForConditionalGeneration's logits at `keep` (what `model(..., logits_to_keep=keep)`
    returns), computed as the module docstring says. `compile=True` compiles the two layer functions once: every
    layer passes through the same compiled code (the layer is an argument, not a constant)."""

    def __init__(self, llava, *, compile: bool = False, autocast=contextlib.nullcontext):
        self.llava = llava
        self.autocast = autocast  # the accelerator's: what its prepared model.forward runs under
        self._past: dict = {}
        self.layer_step = _compiled(layer_step, h=(0, 1), cos=(0, 1), sin=(0, 1), mask=(0, 2, 3)) if compile \
            else layer_step
        self.last_layer_rows = _compiled(last_layer_rows, h=(0, 1), cos=(0, 1), sin=(0, 1), rows=(0,),
                                         mask=(0, 2, 3)) if compile else last_layer_rows
        self.tower_layers = tower_layers_used(llava)

    def image_features(self, pixel_values):
        """The projected image features of every image, concatenated ([B * image tokens, d])."""
        model, cfg = self.llava.model, self.llava.config
        if self.tower_layers is not None:
            feats = tower_features(model.vision_tower, pixel_values, self.tower_layers,
                                   cfg.vision_feature_select_strategy == "default")
            return model.multi_modal_projector(feats).flatten(0, 1)
        out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                       return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    @staticmethod
    def supports(llava) -> bool:
        """A frozen Llama-family language model only: the layer functions above are LlamaDecoderLayer's forward,
        and the kept prefix keys and values are valid only while the weights do not change."""
        lm = llava.model.language_model
        layers = getattr(lm, "layers", [])
        return (len(layers) > 0 and all(type(la).__name__ == "LlamaDecoderLayer" for la in layers)
                and not any(p.requires_grad for p in lm.parameters()))

    def prefix(self, input_ids, attention_mask, keep) -> int:
        """The prefix this batch can share (`prefix_length`), or 0 where a position whose logits are kept lies
        inside it (its row would not be computed)."""
        p = prefix_length(input_ids, attention_mask, self.llava.config.image_token_id)
        return p if p and len(keep) and int(keep.min()) >= p else 0

    def logits(self, input_ids, pixel_values, keep, prefix: int, mask=None, position_ids=None):
        """input_ids [B, T], `keep` (positions on the device, all >= prefix) -> logits [B, len(keep), V].
        Causal with positions 0..T-1 by default; `mask` (additive [B, 1, T, T]) and `position_ids` ([B, T]) as
        scoring passes them (the prefix rows must be unpadded: `prefix_length` checks)."""
        with self.autocast():
            return self._logits(input_ids, pixel_values, keep, prefix, mask, position_ids)

    def prefix_kv(self, prefix_ids):
        """Each layer's (k, v) of the prefix [1, P]. The LLM is frozen, so they are computed once per distinct
        prefix (a run has one: the system prompt) and kept; batch 1, no gradient."""
        key = tuple(prefix_ids[0].tolist())
        if key not in self._past:
            lm = self.llava.model.language_model
            layers = list(lm.layers)
            with torch.no_grad():
                h = lm.embed_tokens(prefix_ids.to(lm.embed_tokens.weight.device))
                cos, sin = lm.rotary_emb(h, torch.arange(len(key), device=h.device)[None])
                past = []
                for layer in layers[:-1]:
                    h, k, v = self.layer_step(layer, h, cos, sin)
                    past.append((k, v))
                # the last layer's prefix rows: only their keys and values
                k, v = _qkv(layers[-1].self_attn, layers[-1].input_layernorm(h), "kv")
                past.append((_rope(k, cos, sin), v))
            self._past = {key: past}  # one entry: a run has one prefix, so nothing older is worth its memory
        return self._past[key]

    def embed(self, input_ids, pixel_values, prefix: int, position_ids=None):
        """The rows after the shared prefix as the first layer takes them: (h, cos, sin), the token embeddings with
        the image features in place of the image tokens, and their rotary cos/sin at positions prefix..T-1 (or
        `position_ids[:, prefix:]`)."""
        lm = self.llava.model.language_model
        image = self.image_features(pixel_values)
        rest = input_ids[:, prefix:].to(pixel_values.device)
        h = lm.embed_tokens(rest)
        h = h.masked_scatter((rest == self.llava.config.image_token_id)[..., None], image.to(h.dtype))
        positions = (torch.arange(prefix, input_ids.shape[1], device=h.device)[None] if position_ids is None
                     else position_ids[:, prefix:])
        cos, sin = lm.rotary_emb(h, positions)
        return h, cos, sin

    def _logits(self, input_ids, pixel_values, keep, prefix: int, mask=None, position_ids=None):
        lm = self.llava.model.language_model
        layers = list(lm.layers)
        past = self.prefix_kv(input_ids[:1, :prefix])
        h, cos, sin = self.embed(input_ids, pixel_values, prefix, position_ids)
        if mask is not None:
            mask = mask[:, :, prefix:]
        for layer, (k, v) in zip(layers[:-1], past[:-1]):
            h, _, _ = self.layer_step(layer, h, cos, sin, k, v, mask)
        h = self.last_layer_rows(layers[-1], h, cos, sin, *past[-1], keep - prefix, mask)
        return self.llava.lm_head(lm.norm(h))
