"""The fine-tuning loss, computed only where it is defined.

Only the answer tokens are supervised (5 of ~640 positions in a classification example), so the LM head and the
fp32 cross-entropy run at the positions that predict one: `logits_to_keep` takes an index tensor (the union over
the micro-batch of positions whose next token is supervised). The sum is the same as over full-length logits with
`ignore_index`, without a [batch, length, 32k] fp32 logits tensor and its gradient.
"""

from __future__ import annotations

import torch.nn.functional as F

from mysproj.models.conversation import IGNORE_INDEX


def supervised_positions(labels):
    """Positions p (shared by the batch) whose next token p+1 is supervised in at least one row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def answer_loss_sum(model, batch: dict, pixel_dtype, device, shared=None):
    """Sum over the micro-batch of the token cross-entropy of supervised tokens (a 0-dim tensor on `device`).
    `batch` holds input_ids, attention_mask, pixel_values and labels (right-padded, -100 where unsupervised).
    `shared` (a `SharedPrefixForward`, projector strategy) computes the same logits without the shared prefix's
    and the last layer's unread work, wherever the batch allows it."""

    labels, ids = batch["labels"], batch["input_ids"]
    keep = supervised_positions(labels)
    targets = labels[:, 1:][:, keep].to(device, non_blocking=True)
    pixels = batch["pixel_values"].to(device, pixel_dtype)
    prefix = 0 if shared is None else shared.prefix(ids, batch["attention_mask"], keep)
    if prefix:
        logits = shared.logits(ids, pixels, keep.to(device), prefix).float()
    else:
        out = model(input_ids=ids.to(device), attention_mask=batch["attention_mask"].to(device),
                    pixel_values=pixels, use_cache=False, logits_to_keep=keep.to(device))
        logits = out.logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
