"""Projector gradient of one batch on the 7B shapes: bf16 (the stage's autocast), FP8 input gradients, and an fp32
reference; relative error and cosine of each against fp32."""
import torch
from mysproj.bench import synthetic
from mysproj.models import fp8 as F8
from mysproj.models.init import build_random_llava
from mysproj.training.loss import answer_loss_sum

model, tok, _ = build_random_llava("llava-1.5-7b", seed=0, dtype="bfloat16", device="cuda")
model.requires_grad_(False)
proj = model.model.multi_modal_projector
proj.float().requires_grad_(True)
layout = synthetic.TokenLayout.with_text(64, answer=5)
res = {}
for seed in (1, 2):
    b = synthetic.token_batch(model.config, layout, 4, seed=seed, labels=True)
    b["pixel_values"] = synthetic.pixel_batch(model.config, 4, seed=seed)
    b = {k: v.cuda() for k, v in b.items()}
    def grad(autocast):
        for p in proj.parameters(): p.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = answer_loss_sum(model, b, torch.bfloat16 if autocast else torch.float32, "cuda")
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in proj.parameters()])
    model.model.language_model.to(torch.bfloat16); model.model.vision_tower.to(torch.bfloat16); model.lm_head.to(torch.bfloat16)
    l0, g0 = grad(True)
    n = F8.convert_frozen_linears(model.model.language_model, exclude=("lm_head",), min_features=1024, forward_fp8=False)
    l1, g1 = grad(True)
    real = F8.fp8_capable
    F8.fp8_capable = lambda *a: False
    l2, g2 = grad(True)
    model.float()
    lr, gr = grad(False)
    F8.fp8_capable = real
    def cmp(g): return f"rel err {((g - gr).norm() / gr.norm()).item():.4f}, cos {torch.nn.functional.cosine_similarity(g, gr, dim=0).item():.6f}"
    print(f"batch {seed}: {len(n)} layers; loss bf16 {l0:.5f} fp8-bwd {l1:.5f} (fallback {l2:.5f}) fp32 {lr:.5f}")
    print(f"  bf16 vs fp32:        {cmp(g0)}   (fallback identical to bf16: {torch.equal(g0, g2)})")
    print(f"  fp8-bwd vs fp32:     {cmp(g1)}")
    print(f"  fp8-bwd vs bf16: rel {((g1 - g0).norm() / g0.norm()).item():.4f}")
    # undo the conversion for the next batch
    for mod in list(model.model.language_model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, F8.Float8Linear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lin.weight = child.weight; lin.bias = child.bias
                setattr(mod, name, lin)
