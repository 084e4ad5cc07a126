"""A/B (model only, bf16, batch 256): open_clip compiled blocks vs ClipTower (v2: patch GEMM + add fused into the
next norm) vs v2 with FA2 first. The session also ran v1 (before the patch GEMM and the add fusion) from a copy of
the module that is not kept; its numbers are in tower-ab.txt. `--fp8` adds the FP8 tower (apply
fp8-tried/clip_tower_fp8.patch first)."""
import sys, tempfile, torch
from torch.nn.attention import sdpa_kernel, SDPBackend
from mysproj.bench.eval_clip import _random_clip, class_names
from mysproj.models.clip import load_clip
from mysproj.models import clip_tower as v2
from mysproj.stages import eval_clip
torch.set_grad_enabled(False)
B = 256

def timeit(fn, x, n=12):
    for _ in range(3): fn(x)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(n): fn(x)
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n

def prof(fn, name):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(xb); torch.cuda.synchronize()
    print(name); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))

with tempfile.TemporaryDirectory() as tmp:
    clip = load_clip(_random_clip("clip-vit-l-14-336", tmp + "/m", 0), device="cuda")
    text = eval_clip.class_embeddings(clip, class_names(47), "paper", "cuda")
    x = torch.randn(B, 3, 336, 336, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    ref32 = clip.model.encode_image(x, normalize=True); pred32 = (ref32 @ text.T).argmax(-1)
    eval_clip.prepare_image_tower(clip, "bf16", False, B)
    xb = x.bfloat16(); eager = clip.model.encode_image(xb, normalize=True).float()
    pe = (eager @ text.T).argmax(-1)
    def report(name, fn):
        ms = timeit(fn, xb); emb = fn(xb).float(); p = (emb @ text.T).argmax(-1)
        print(f"{name:40s} {B/ms*1000:7.0f} images/s {ms:6.1f} ms | max|d| vs fp32 {(emb-ref32).abs().max().item():.4f}"
              f" | same class as fp32 {(p==pred32).float().mean().item()*100:.1f}% as eager bf16 {(p==pe).float().mean().item()*100:.1f}%", flush=True)
    b = v2.ClipTower.of(clip, compile=True); report("v2 ClipTower (patch GEMM, add+norm)", b.encode)
    prof(b.encode, "v2")
    torch._dynamo.reset()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        c = v2.ClipTower.of(clip, compile=True); report("v2, FA2 first", c.encode)
    if "--fp8" in sys.argv:
        torch._dynamo.reset()
        f8 = v2.ClipTower.of(clip, compile=True, fp8=True); report("v2, FP8 block matmuls", f8.encode)
        prof(f8.encode, "v2 fp8")
    torch._dynamo.reset()
    for m in clip.model.visual.transformer.resblocks: m.compile()
    report("open_clip compiled blocks (before)", lambda v: clip.model.encode_image(v, normalize=True))
