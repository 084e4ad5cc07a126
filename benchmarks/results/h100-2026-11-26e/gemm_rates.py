import torch
def rate(m, k, n, dtype, iters=30):
    a = torch.randn(m, k, device="cuda", dtype=dtype); b = torch.randn(n, k, device="cuda", dtype=dtype)
    for _ in range(5): a @ b.t()
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(iters): a @ b.t()
    e.record(); torch.cuda.synchronize(); ms = s.elapsed_time(e) / iters
    return 2 * m * k * n / ms / 1e9
for dtype in (torch.float16, torch.bfloat16):
    for name, (m, k, n) in {"llm qkv/o 45k x 4096 -> 4096": (45056, 4096, 4096), "llm gate/up -> 11008": (45056, 4096, 11008),
                             "llm down 11008 -> 4096": (45056, 11008, 4096), "clip fc1 1024 -> 4096": (147712, 1024, 4096),
                             "clip fc2 4096 -> 1024": (147712, 4096, 1024), "clip qkv 1024 -> 3072": (147712, 1024, 3072),
                             "square 8192": (8192, 8192, 8192)}.items():
        print(f"{str(dtype):15s} {name:32s} {rate(m, k, n, dtype):6.0f} TFLOP/s", flush=True)
