"""A/B: open_clip compiled blocks vs ClipTower (default SDPA / cuDNN first / no CLS-only), model only, bf16."""
import tempfile, torch, sys
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from mysproj.bench.eval_clip import _random_clip, class_names
from mysproj.models.clip import load_clip
from mysproj.models import clip_tower as ct
from mysproj.stages import eval_clip

B = 256
torch.set_grad_enabled(False)
def timeit(fn, x, n=10):
    for _ in range(3): fn(x)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(n): fn(x)
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n

def prof(fn, name):
    if "--prof" not in sys.argv:
        return
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(xb); torch.cuda.synchronize()
    print(name); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=80))

with tempfile.TemporaryDirectory() as tmp:
    d = _random_clip("clip-vit-l-14-336", tmp + "/m", 0)
    clip = load_clip(d, device="cuda")
    text = eval_clip.class_embeddings(clip, class_names(47), "paper", "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, 3, 336, 336, device="cuda", generator=g)
    with torch.no_grad():
        ref32 = clip.model.encode_image(x, normalize=True)
    pred32 = (ref32 @ text.T).argmax(-1)
    tower = eval_clip.prepare_image_tower(clip, "bf16", False, B)
    xb = x.bfloat16()
    with torch.no_grad():
        eager = clip.model.encode_image(xb, normalize=True).float()
    def report(name, emb, ms):
        p = (emb.float() @ text.T).argmax(-1)
        print(f"{name:42s} {B/ms*1000:7.0f} images/s {ms:6.1f} ms | max|d| vs eager bf16 {(emb.float()-eager).abs().max().item():.4f}"
              f" vs fp32 {(emb.float()-ref32).abs().max().item():.4f} | same class as fp32 {(p==pred32).float().mean().item()*100:.1f}%"
              f" as eager bf16 {(p==(eager@text.T).argmax(-1)).float().mean().item()*100:.1f}%", flush=True)
    report("eager open_clip bf16", eager, timeit(lambda v: clip.model.encode_image(v, normalize=True), xb, 3))
    # ClipTower variants (built before the module compile so they see plain weights)
    fast = ct.ClipTower.of(clip, compile=True)
    fast_emb = fast.encode(xb); report("ClipTower compiled, default SDPA", fast_emb, timeit(fast.encode, xb))
    prof(fast.encode, "ClipTower")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        torch._dynamo.reset()
        fc = ct.ClipTower.of(clip, compile=True)
        report("ClipTower compiled, cuDNN first", fc.encode(xb), timeit(fc.encode, xb))
    torch._dynamo.reset()
    class NoCls(ct.ClipTower):
        def encode(self, pixels):
            with torch.no_grad():
                x = F.conv2d(pixels.to(self.patch.dtype), self.patch, stride=self.patch.shape[-1]).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + self.pos.to(x.dtype)
                x = ct._norm(x, self.pre)
                for w in self.blocks: x = self.block(x, w, self.heads, self.act)
                return F.normalize(ct._norm(x[:, 0], self.post) @ self.proj, dim=-1)
    nc = NoCls(*ct._open_clip_parts(clip.model.visual), compile=True)
    report("ClipTower compiled, all rows in last block", nc.encode(xb), timeit(nc.encode, xb))
    torch._dynamo.reset()
    for m in clip.model.visual.transformer.resblocks: m.compile()
    report("open_clip compiled blocks (stage today)", clip.model.encode_image(xb, normalize=True), timeit(lambda v: clip.model.encode_image(v, normalize=True), xb))
    prof(lambda v: clip.model.encode_image(v, normalize=True), "open_clip compiled")
