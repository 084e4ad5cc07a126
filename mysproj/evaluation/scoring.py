"""Batched LLaVA inputs and class scoring by log-likelihood, reusing the image+prompt prefix.

Scoring runs the left-padded prefix (image tokens + prompt) once per batch and keeps its KV cache; then all
class continuations (" <label></s>", tokenized as in training) go through the model in one block after it, with
a 4-D attention mask so that each continuation sees the prefix and its own earlier tokens only, and position
ids that restart after the prefix for every class. One prefix pass + one short pass per batch, whatever the
number of classes: equal to scoring each full sequence separately, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Batch:
    input_ids: object       # [B, L] left-padded
    attention_mask: object  # [B, L]
    position_ids: object    # [B, L] as generate() derives them (0 at the first real token)


def left_pad(rows: list[list[int]], pad_id: int, device) -> Batch:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device))


def prompt_ids(tokenizer, prompt: str, image_token_id: int, image_seq_length: int) -> list[int]:
    from mysproj.models.conversation import expand_image_tokens

    return expand_image_tokens(tokenizer(prompt, add_special_tokens=True)["input_ids"], image_token_id,
                               image_seq_length)


def continuation_ids(tokenizer, label: str) -> list[int]:
    """The answer tokens exactly as training supervises them: " <label>" then `</s>`."""
    return tokenizer(f" {label}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _continuation_block(conts: list[list[int]], prefix_mask, dtype, device):
    """Token ids [S], per-token segment [S], offset in segment [S], and the additive 4-D mask
    [B, 1, S, L + S] for all continuations laid end to end after a prefix with 2-D mask `prefix_mask`."""
    import torch

    ids, seg, off = [], [], []
    for k, c in enumerate(conts):
        ids += c
        seg += [k] * len(c)
        off += list(range(len(c)))
    ids_t = torch.tensor(ids, device=device)
    seg_t = torch.tensor(seg, device=device)
    off_t = torch.tensor(off, device=device)
    own = (seg_t[:, None] == seg_t[None, :]) & (off_t[None, :] <= off_t[:, None])        # [S, S]
    allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(-1, len(ids), -1),
                         own[None].expand(prefix_mask.shape[0], -1, -1)], dim=-1)       # [B, S, L+S]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids_t, seg_t, off_t, mask[:, None]


def score_continuations(model, batch: Batch, pixel_values, conts: list[list[int]]):
    """(scores [B, K] = sum of log p(continuation k | prefix), prefix next-token logits [B, V])."""
    import torch

    with torch.no_grad():
        pre = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                    pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        first_logits = pre.logits[:, -1].float()
        dtype = next(model.parameters()).dtype
        ids, seg, off, mask = _continuation_block(conts, batch.attention_mask, dtype, batch.input_ids.device)
        b = batch.input_ids.shape[0]
        real_len = batch.attention_mask.sum(-1, keepdim=True)                               # [B, 1]
        cont = model(input_ids=ids[None].expand(b, -1), attention_mask=mask, position_ids=real_len + off[None],
                     past_key_values=pre.past_key_values, use_cache=False)
        logp_next = torch.log_softmax(cont.logits.float(), dim=-1)                          # [B, S, V]
        logp_first = torch.log_softmax(first_logits, dim=-1)                                # [B, V]
        # token t of segment k is predicted by the prefix (offset 0) or by token t-1 of the same segment
        tok_lp = torch.empty((b, len(ids)), device=ids.device)
        first = off == 0
        tok_lp[:, first] = logp_first[:, ids[first]]
        later = torch.nonzero(~first).squeeze(-1)
        if len(later):
            tok_lp[:, later] = logp_next[:, later - 1, ids[later]]
        scores = torch.zeros((b, len(conts)), device=ids.device).index_add_(1, seg, tok_lp)
    return scores, first_logits
