"""CLIP's unit image embedding (what `encode_image(pixels, normalize=True)` returns) as plain functions over the
model's own weights: the zero-shot classifier's fast path (eval-clip, `fast_tower`).

- **Attention without layout copies.** `nn.MultiheadAttention` (open_clip's blocks) works sequence-first: it
  transposes the batch in, splits the packed projection, and copies the heads back out, passes over memory that
  do no arithmetic. Here one q/k/v matmul feeds SDPA through strided views of its [B, T, 3, H, D] output, and the
  attention output is already [B, T, H * D].
- **The last block at the class token only.** The embedding is read from the CLS row alone. The last block still
  needs keys and values for every token (the CLS query attends to them), but its query, attention output and MLP
  run at one row.
- **Fewer passes over memory.** The patch convolution is one matmul over the image's tiles (a stride-p
  convolution is one, and GEMM kernels are better tuned than cuDNN's for it), and each block's last residual add
  is left to the next block, whose first kernel adds and normalises in one pass.
- **One compiled graph for all middle blocks** (the weights are arguments, not constants), plus one each for the
  patch embedding, the first block and the last.

The arithmetic is the model's own (the CPU tests check it against open_clip's and transformers' forward in fp32).
`ClipTower.of(clip)` returns None for a tower it does not cover (attentional pooling, layer scale, a patch
dropout in training mode, other activations); callers then use the model's `encode_image`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "quick_gelu")


class Norm(NamedTuple):  # a tuple, so that one compiled graph serves every block's norms
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    fp32: bool = False  # open_clip's LayerNormFp32: normalise in fp32, cast back


def _norm(x, n: Norm):
    y = F.layer_norm(x.float() if n.fp32 else x, (x.shape[-1],), n.weight, n.bias, n.eps)
    return y.to(x.dtype)


def _act(x, act: str):
    return F.gelu(x) if act == "gelu" else x * torch.sigmoid(1.702 * x)


def embed(pixels, patch, cls, pos, pre: Norm | None):
    """Patch embedding as one matmul (a stride-p convolution is one), the class token, positions and the
    pre-norm: [B, 3, S, S] -> [B, 1 + (S/p)², E]."""
    b, c, s, _ = pixels.shape
    e, p = patch.shape[0], patch.shape[-1]
    g = s // p
    tiles = pixels.to(patch.dtype).view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
    x = torch.cat([cls.to(tiles.dtype).expand(b, 1, e), tiles @ patch.reshape(e, -1).t()], dim=1) + pos.to(tiles.dtype)
    return x if pre is None else _norm(x, pre)


def block(x, d, w: tuple, heads: int, act: str, cls_only: bool = False):
    """One pre-norm transformer block over the residual stream x + d ([B, T, E]; d None or the previous block's
    MLP output, added here so that one kernel adds and normalises); returns (x', d') with output x' + d'.
    w = (norm1, qkv weight [3E, E], qkv bias, out weight, out bias, norm2, fc1 weight, fc1 bias, fc2 weight,
    fc2 bias). `cls_only`: the output at row 0 only ([B, 1, E])."""
    n1, qkv_w, qkv_b, out_w, out_b, n2, fc1_w, fc1_b, fc2_w, fc2_b = w
    if d is not None:
        x = x + d
    b, t, e = x.shape
    h = _norm(x, n1)
    if cls_only:
        k, v = F.linear(h, qkv_w[e:], qkv_b[e:]).view(b, t, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.linear(h[:, :1], qkv_w[:e], qkv_b[:e]).view(b, 1, heads, -1).transpose(1, 2)
        x = x[:, :1]
    else:
        q, k, v = F.linear(h, qkv_w, qkv_b).view(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)                     # [B, H, Tq, D]
    x = x + F.linear(o.transpose(1, 2).reshape(b, x.shape[1], e), out_w, out_b)
    return x, F.linear(_act(F.linear(_norm(x, n2), fc1_w, fc1_b), act), fc2_w, fc2_b)


class ClipTower:
    """`encode(pixels)` -> [B, D] unit image embeddings. Build with `ClipTower.of(loaded_clip)`; `compile=True`
    compiles `embed` and `block` (three block graphs: the first, the middle ones, the last at the CLS row)."""

    def __init__(self, patch, cls, pos, pre: Norm | None, blocks: list[tuple], heads: int, act: str, post: Norm,
                 proj, *, compile: bool = False):
        self.patch, self.cls, self.pos, self.pre = patch, cls, pos, pre
        self.blocks, self.heads, self.act, self.post, self.proj = blocks, heads, act, post, proj
        self.embed = torch.compile(embed) if compile else embed
        self.block = torch.compile(block) if compile else block

    @classmethod
    def of(cls, clip, *, compile: bool = False) -> ClipTower | None:
        parts = _hf_parts(clip.model.model) if clip.kind == "hf" else _open_clip_parts(clip.model.visual)
        return None if parts is None else cls(*parts, compile=compile)

    def encode(self, pixels):
        with torch.no_grad():
            x, d = self.embed(pixels, self.patch, self.cls, self.pos, self.pre), None
            for w in self.blocks[:-1]:
                x, d = self.block(x, d, w, self.heads, self.act)
            x, d = self.block(x, d, self.blocks[-1], self.heads, self.act, True)
            return F.normalize(_norm((x + d)[:, 0], self.post) @ self.proj, dim=-1)


def _norm_of(ln) -> Norm:
    return Norm(ln.weight, ln.bias, ln.eps, type(ln).__name__ == "LayerNormFp32")


def _open_clip_parts(visual):
    """The open_clip VisionTransformer's weights, or None where its forward is not the plain CLIP one."""

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if (not blocks or getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", None) != "tok"
            or getattr(visual, "proj", None) is None or visual.conv1.bias is not None
            or (visual.training and getattr(visual.patch_dropout, "prob", 0.0) > 0)):
        return None
    acts = set()
    for b in blocks:
        act = b.mlp.gelu
        acts.add("gelu" if type(act) is nn.GELU and act.approximate == "none"
                 else "quick_gelu" if type(act).__name__ == "QuickGELU" else None)
        if (type(b).__name__ != "ResidualAttentionBlock" or hasattr(b, "ln_1_kv")
                or not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity)
                or b.attn.in_proj_weight is None or b.attn.in_proj_bias is None):
            return None
    if len(acts) != 1 or None in acts:
        return None
    ws = [(_norm_of(b.ln_1), b.attn.in_proj_weight, b.attn.in_proj_bias, b.attn.out_proj.weight,
           b.attn.out_proj.bias, _norm_of(b.ln_2), b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight,
           b.mlp.c_proj.bias) for b in blocks]
    pre = None if isinstance(visual.ln_pre, nn.Identity) else _norm_of(visual.ln_pre)
    return (visual.conv1.weight, visual.class_embedding, visual.positional_embedding, pre, ws,
            blocks[0].attn.num_heads, acts.pop(), _norm_of(visual.ln_post), visual.proj)


def _hf_parts(model):
    """transformers' CLIPModel image side, or None for a configuration this does not cover. q/k/v are
    concatenated into one weight (a copy)."""
    vm, cfg = model.vision_model, model.config.vision_config
    emb = vm.embeddings
    if (cfg.hidden_act not in ACTIVATIONS or emb.patch_embedding.bias is not None
            or getattr(model.visual_projection, "bias", None) is not None):
        return None
    ws = []
    for la in vm.encoder.layers:
        a = la.self_attn
        ws.append((_norm_of(la.layer_norm1), torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                   torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]), a.out_proj.weight, a.out_proj.bias,
                   _norm_of(la.layer_norm2), la.mlp.fc1.weight, la.mlp.fc1.bias, la.mlp.fc2.weight, la.mlp.fc2.bias))
    return (emb.patch_embedding.weight, emb.class_embedding, emb.position_embedding.weight,
            _norm_of(vm.pre_layrnorm), ws, cfg.num_attention_heads, cfg.hidden_act, _norm_of(vm.post_layernorm),
            model.visual_projection.weight.t())
