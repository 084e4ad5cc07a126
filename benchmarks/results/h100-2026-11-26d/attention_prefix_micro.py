import torch, torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
torch.manual_seed(0)
B,H,P,R,D = 16,32,35,605,128
T = P + R
dev, dt = "cuda", torch.bfloat16
q = torch.randn(B,H,R,D, device=dev, dtype=dt, requires_grad=True)
k = torch.randn(B,H,T,D, device=dev, dtype=dt, requires_grad=True)
v = torch.randn(B,H,T,D, device=dev, dtype=dt, requires_grad=True)
g = torch.randn(B,H,R,D, device=dev, dtype=dt)
def pad():
    qq = torch.cat([q.new_zeros(B,H,P,D), q], 2)
    return F.scaled_dot_product_attention(qq, k, v, is_causal=True)[:, :, P:]
def lower_right():
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(R, T))
def cudnn_direct():
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[0]
def flash_direct():
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[0]
qf = torch.randn(B,H,T,D, device=dev, dtype=dt, requires_grad=True)
gf = torch.randn(B,H,T,D, device=dev, dtype=dt)
def full640():
    return F.scaled_dot_product_attention(qf, k, v, is_causal=True)
ref = None
for name, fn in [("pad+causal", pad), ("lower_right(CausalBias)", lower_right), ("cudnn is_causal q<kv", cudnn_direct), ("flash is_causal q<kv", flash_direct), ("full 640 causal", full640)]:
    try:
        out = fn()
        gg = gf if name.startswith("full") else g
        if ref is None: ref = out.detach().float()
        err = (out.detach().float() - ref).abs().max().item() if out.shape == ref.shape else float("nan")
        for _ in range(3):
            fn().backward(gg)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20): fn()
        e.record(); e.synchronize(); f_ms = s.elapsed_time(e)/20
        s.record()
        for _ in range(20): fn().backward(gg)
        e.record(); e.synchronize(); fb_ms = s.elapsed_time(e)/20
        print(f"{name:28s} maxerr {err:.4f}  fwd {f_ms:.3f} ms  fwd+bwd {fb_ms:.3f} ms")
    except Exception as ex:
        print(name, "FAILED", type(ex).__name__, str(ex)[:200])
