"""The paper's richness probes: an independent MLP trained on frozen image features (docs/paper.md).

Shapes are the released ones, hidden widths fixed; only the input width (1024 pre / 4096 post on LLaVA-1.5-7B,
smaller on the tiny preset) and the class count vary:

    pre  (A.3): in-2000-3600-1024-600-256-C
    post (A.2, `mlp_model2`): in-2048-1536-1024-512-256-C

Two training protocols, because the paper and its code disagree (docs/recipe.md):
    paper: Adam lr 1e-4, batch 128, early stopping on the loss of a validation split carved from train
           (stratified where possible), patience epochs, best weights restored;
    code:  Adam lr 1e-3, batch 32, exactly `max_epochs` (100) epochs, no early stopping (the released script).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from sklearn.model_selection import train_test_split

log = logging.getLogger(__name__)

PRE_HIDDEN = (2000, 3600, 1024, 600, 256)
POST_HIDDEN = (2048, 1536, 1024, 512, 256)


@dataclass(frozen=True)
class Protocol:
    lr: float
    batch_size: int
    early_stopping: bool


PROTOCOLS = {"paper": Protocol(lr=1e-4, batch_size=128, early_stopping=True),
             "code": Protocol(lr=1e-3, batch_size=32, early_stopping=False)}


def build_mlp(kind: str, in_features: int, num_classes: int):
    """`kind` = "pre" or "post": Linear-ReLU stacks ending in a bare Linear to the class logits."""

    hidden = {"pre": PRE_HIDDEN, "post": POST_HIDDEN}[kind]
    layers: list = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _validation_split(y, fraction: float, seed: int):
    """Indices (train, val); stratified when every class has at least two examples."""

    idx = np.arange(len(y))
    counts = np.bincount(y)
    n_val = int(round(len(y) * fraction))
    if n_val < 1 or len(y) - n_val < 1:
        return idx, idx[:0]
    stratify = y if counts[counts > 0].min() >= 2 and n_val >= len(counts[counts > 0]) else None
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def train_probe(kind: str, x_train, y_train, num_classes: int, *, protocol: str = "paper", seed: int = 0,
                max_epochs: int = 100, patience: int = 5, val_fraction: float = 0.1, device: str = "cpu"):
    """Train one probe; returns (model in eval mode, history dict). `x_*` float arrays, `y_*` int class ids."""

    proto = PROTOCOLS[protocol]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    y_train = np.asarray(y_train, dtype=np.int64)
    if proto.early_stopping:
        tr, va = _validation_split(y_train, val_fraction, seed)
    else:
        tr, va = np.arange(len(y_train)), np.arange(0)
    xt = torch.as_tensor(np.asarray(x_train)[tr], dtype=torch.float32, device=device)
    yt = torch.as_tensor(y_train[tr], device=device)
    xv = torch.as_tensor(np.asarray(x_train)[va], dtype=torch.float32, device=device)
    yv = torch.as_tensor(y_train[va], device=device)

    model = build_mlp(kind, xt.shape[1], num_classes).to(device)
    # the multi-tensor Adam pays off on GPUs; on a small CPU the per-tensor one is quicker
    opt = torch.optim.Adam(model.parameters(), lr=proto.lr, foreach=not str(device).startswith("cpu"))
    loss_fn = nn.CrossEntropyLoss()
    history: dict = {"train_loss": [], "val_loss": [], "epochs": 0, "best_epoch": None,
                     "n_train": len(tr), "n_val": len(va), "protocol": protocol, "lr": proto.lr,
                     "batch_size": proto.batch_size}
    best_loss, best_state, bad = float("inf"), None, 0
    for epoch in range(max_epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen).to(device)
        total = 0.0
        for start in range(0, len(order), proto.batch_size):
            batch = order[start:start + proto.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        history["train_loss"].append(total / max(len(xt), 1))
        history["epochs"] = epoch + 1
        if not proto.early_stopping or len(xv) == 0:
            continue
        model.eval()
        with torch.no_grad():
            val = loss_fn(model(xv), yv).item()
        history["val_loss"].append(val)
        if val < best_loss:
            best_loss, bad, history["best_epoch"] = val, 0, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    log.info("probe %s (%s): %d epochs%s", kind, protocol, history["epochs"],
             f", best {history['best_epoch']}" if history["best_epoch"] else "")
    return model, history


def predict(model, x, device: str = "cpu", batch_size: int = 1024):
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[start:start + batch_size]), dtype=torch.float32, device=device)
            out.append(model(xb).argmax(dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
