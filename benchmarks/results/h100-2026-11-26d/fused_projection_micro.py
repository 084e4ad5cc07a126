import torch, torch.nn.functional as F
torch.manual_seed(0)
M, d, Fd = 16 * 605, 4096, 11008
dev, dt = "cuda", torch.bfloat16
x = torch.randn(M, d, device=dev, dtype=dt)
wq, wk, wv = (torch.randn(d, d, device=dev, dtype=dt) * 0.02 for _ in range(3))
wg, wu = (torch.randn(Fd, d, device=dev, dtype=dt) * 0.02 for _ in range(2))
wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])
gq = torch.randn(M, d, device=dev, dtype=dt); gqkv = torch.randn(M, 3 * d, device=dev, dtype=dt)
gg = torch.randn(M, Fd, device=dev, dtype=dt); ggu = torch.randn(M, 2 * Fd, device=dev, dtype=dt)
def t(fn, n=20):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n): fn()
    e.record(); e.synchronize(); return s.elapsed_time(e) / n
sep_f = t(lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv), F.linear(x, wg), F.linear(x, wu)))
fus_f = t(lambda: (F.linear(x, wqkv), F.linear(x, wgu)))
sep_b = t(lambda: gq @ wq + gq @ wk + gq @ wv + gg @ wg + gg @ wu)
fus_b = t(lambda: (gqkv @ wqkv, ggu @ wgu))
fl_f = 2 * M * d * (3 * d + 2 * Fd)
for name, ms in (("separate fwd", sep_f), ("fused fwd", fus_f), ("separate dX (+adds)", sep_b), ("fused dX", fus_b)):
    print(f"{name:22s} {ms:.3f} ms  {fl_f / ms / 1e9:.0f} TFLOP/s")
# one-layer down/o for reference
go = torch.randn(M, d, device=dev, dtype=dt); wo = torch.randn(d, d, device=dev, dtype=dt); wd = torch.randn(d, Fd, device=dev, dtype=dt)
print("o+down fwd", round(t(lambda: (F.linear(x, wo), F.linear(gg, wd))), 3))
