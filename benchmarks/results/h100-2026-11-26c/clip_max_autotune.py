import tempfile, time, torch
from mysproj.bench.eval_clip import _random_clip, class_names
from mysproj.models.clip import load_clip
from mysproj.stages import eval_clip
from mysproj.stages.eval_clip import _tower_modules

def bench(clip, x, text, tower, label):
    t0 = time.time()
    for _ in range(3): out = eval_clip.classify_batch(clip, x, text, tower)
    torch.cuda.synchronize(); warm = time.time() - t0
    s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(10): eval_clip.classify_batch(clip, x, text, tower)
    e.record(); torch.cuda.synchronize(); ms = s.elapsed_time(e) / 10
    print(f"{label}: {256 / ms * 1000:.0f} images/s ({ms:.1f} ms), warm-up {warm:.0f} s", flush=True)
    return out.argmax(-1)

with tempfile.TemporaryDirectory() as tmp:
    d = _random_clip("clip-vit-l-14-336", tmp + "/m", 0)
    clip = load_clip(d, device="cuda")
    text = eval_clip.class_embeddings(clip, class_names(47), "paper", "cuda")
    tower = eval_clip.prepare_image_tower(clip, "bf16", False, 256)
    x = torch.randn(256, 3, 336, 336, device="cuda", dtype=tower.dtype)
    eager = bench(clip, x, text, tower, "eager bf16")
    _, blocks = _tower_modules(clip)
    for b in blocks: b.compile()
    default = bench(clip, x, text, tower, "compiled default")
    torch._dynamo.reset()
    import torch._inductor.config as ic
    ic.max_autotune_gemm_backends = "TRITON,ATEN"
    for b in blocks:
        b._compiled_call_impl = None
        b.compile(mode="max-autotune-no-cudagraphs")
    auto = bench(clip, x, text, tower, "compiled max-autotune")
    print("same class as eager: default", (default == eager).float().mean().item(), "autotune", (auto == eager).float().mean().item())
