"""Projector gradient of one batch on the 7B shapes: the model's own bf16 forward (the stage's autocast), the
shared-prefix path in bf16, and an fp32 reference (the model's own forward); relative error and cosine vs fp32."""
import torch
from mysproj.bench import synthetic
from mysproj.models.init import build_random_llava
from mysproj.models.shared_prefix import SharedPrefixForward
from mysproj.training.loss import answer_loss_sum

model, tok, _ = build_random_llava("llava-1.5-7b", seed=0, dtype="bfloat16", device="cuda")
model.requires_grad_(False)
proj = model.model.multi_modal_projector
proj.float().requires_grad_(True)
layout = synthetic.TokenLayout.with_text(64, answer=5)
batches = []
for seed in (1, 2):
    b = synthetic.token_batch(model.config, layout, 4, seed=seed, labels=True)
    b["pixel_values"] = synthetic.pixel_batch(model.config, 4, seed=seed)
    batches.append(b)
def grad(b, autocast, shared=None):
    for p in proj.parameters(): p.grad = None
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        loss = answer_loss_sum(model, b, torch.bfloat16 if autocast else torch.float32, "cuda", shared)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in proj.parameters()])
plain = [grad(b, True) for b in batches]
plain2 = [grad(b, True) for b in batches]
shared = SharedPrefixForward(model, autocast=lambda: torch.autocast("cuda", torch.bfloat16))

fast = [grad(b, True, shared) for b in batches]
model.float()
ref = [grad(b, False) for b in batches]
def cmp(g, gr): return f"rel err {((g - gr).norm() / gr.norm()).item():.4f}, cos {torch.nn.functional.cosine_similarity(g, gr, dim=0).item():.6f}"
for i, seed in enumerate((1, 2)):
    print(f"batch {seed}: loss bf16 {plain[i][0]:.5f} shared-prefix bf16 {fast[i][0]:.5f} fp32 {ref[i][0]:.5f}")
    print(f"  bf16 (model forward) vs fp32:  {cmp(plain[i][1], ref[i][1])}")
    print(f"  bf16 again vs fp32:            {cmp(plain2[i][1], ref[i][1])}")
    print(f"  shared-prefix bf16 vs fp32:    {cmp(fast[i][1], ref[i][1])}")
    print(f"  shared-prefix vs bf16: rel {((fast[i][1] - plain[i][1]).norm() / plain[i][1].norm()).item():.4f}")
