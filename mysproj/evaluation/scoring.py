"""Batched LLaVA inputs and class scoring by log-likelihood, sharing the image+prompt prefix.

Scoring runs one forward pass per batch over the left-padded prefix (image tokens + prompt) followed by all class
continuations (" <label></s>", tokenized as in training; the final `</s>` is scored but not fed, since nothing
after it is) laid end to end, with a 4-D attention mask: the prefix
is causal, each continuation sees the prefix and its own earlier tokens only, and its position ids restart after
the prefix. Logits are computed only at the positions that predict a continuation token. The prefix is computed
once whatever the number of classes, and no KV cache is built (a prefix pass + a cached continuation pass would
spend its time copying the cache): equal to scoring each full sequence separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mysproj.models.conversation import SYSTEM_LLAVA_V1, llava_v1_prompt, v1_text
from mysproj.models.prompt_ids import prompt_ids


@dataclass
class Batch:
    input_ids: object       # [B, L] left-padded
    attention_mask: object  # [B, L]
    position_ids: object    # [B, L] as generate() derives them (0 at the first real token)


def left_pad(rows: list[list[int]], pad_id: int, device) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device))


def continuation_ids(tokenizer, label: str) -> list[int]:
    """The answer tokens as training supervises them: the ids that " <label></s>" adds after "ASSISTANT:" in a
    llava_v1 conversation (so a sentencepiece tokenizer's word-initial `▁` is there, and no extra one)."""

    question = "Which class?"
    head = prompt_ids(tokenizer, llava_v1_prompt(question))
    full = prompt_ids(tokenizer, v1_text(SYSTEM_LLAVA_V1, [(question, label)]))
    if full[:len(head)] != head:
        raise ValueError(f"the tokenizer merges 'ASSISTANT:' with the answer {label!r}: its tokens cannot be scored "
                         f"after the prompt")
    return full[len(head):]


def _scoring_block(conts: list[list[int]], prefix_mask, dtype):
    """The input block after the prefix (2-D mask [B, L]): every continuation but its last token (`</s>`, which
    predicts nothing scored), end to end (S tokens). Returns input ids [S], offset in segment [S] and the
    additive 4-D mask [B, 1, L + S, L + S]."""

    device = prefix_mask.device
    ids, seg, off = [], [], []
    for k, c in enumerate(conts):
        ids += c[:-1]
        seg += [k] * (len(c) - 1)
        off += list(range(len(c) - 1))
    ids_t, seg_t, off_t = (torch.tensor(v, dtype=torch.long, device=device) for v in (ids, seg, off))
    b, n_pre, n_cont = prefix_mask.shape[0], prefix_mask.shape[1], len(ids)
    real = prefix_mask.bool()
    causal = torch.ones((n_pre, n_pre), dtype=torch.bool, device=device).tril()
    pre_rows = torch.cat([causal[None] & real[:, None, :],
                          torch.zeros((b, n_pre, n_cont), dtype=torch.bool, device=device)], dim=-1)
    own = (seg_t[:, None] == seg_t[None, :]) & (off_t[None, :] <= off_t[:, None])          # [S, S]
    cont_rows = torch.cat([real[:, None, :].expand(-1, n_cont, -1), own[None].expand(b, -1, -1)], dim=-1)
    allowed = torch.cat([pre_rows, cont_rows], dim=1)                                       # [B, L+S, L+S]
    # A padding row that sees nothing would make softmax NaN; let it see itself (its output is never read).
    allowed |= torch.eye(n_pre + n_cont, dtype=torch.bool, device=device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids_t, off_t, mask[:, None]


def _targets(conts: list[list[int]], device):
    """For every scored token (all of every continuation, end to end): its id, its segment, and the kept logits
    row that predicts it: row 0 (the last prefix position) for a first token, else row 1 + the block index of
    the same segment's previous token."""

    tok, seg, rows, start = [], [], [], 0
    for k, c in enumerate(conts):
        tok += c
        seg += [k] * len(c)
        rows += [0] + [1 + start + t for t in range(len(c) - 1)]
        start += len(c) - 1
    return (torch.tensor(v, dtype=torch.long, device=device) for v in (tok, seg, rows))


def score_continuations(model, batch: Batch, pixel_values, conts: list[list[int]], fast=None):
    """(scores [B, K] = sum of log p(continuation k | prefix), prefix next-token logits [B, V]). `fast` (a
    `SharedPrefixForward` of `model`) computes the same logits without the system prompt's rows (their keys and
    values are kept across batches) and with the last layer at the read rows only, where the batch allows."""

    if any(len(c) < 2 for c in conts):
        raise ValueError("each continuation ends with </s> after at least one label token")
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        ids, off, mask = _scoring_block(conts, batch.attention_mask, dtype)
        b, n_pre = batch.input_ids.shape
        real_len = batch.attention_mask.sum(-1, keepdim=True)                               # [B, 1]
        # logits at the last prefix position and at every block token: each predicts a scored token
        keep = torch.cat([torch.tensor([n_pre - 1], device=ids.device), n_pre + torch.arange(len(ids),
                                                                                             device=ids.device)])
        input_ids = torch.cat([batch.input_ids, ids[None].expand(b, -1)], dim=1)
        position_ids = torch.cat([batch.position_ids, real_len + off[None]], dim=1)
        prefix = 0 if fast is None else fast.prefix(batch.input_ids, batch.attention_mask, keep)
        if prefix:
            logits = fast.logits(input_ids, pixel_values, keep, prefix, mask=mask, position_ids=position_ids)
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                           pixel_values=pixel_values, use_cache=False, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), dim=-1)                                    # [B, 1+S, V]
        first_logits = logits[:, 0].float()
        tok, seg, rows = _targets(conts, ids.device)
        tok_lp = logp[:, rows, tok]                                                          # [B, T]
        scores = torch.zeros((b, len(conts)), device=ids.device).index_add_(1, seg, tok_lp)
    return scores, first_logits
