"""decode=device for LLaVA's preprocessing on a GPU: pixels against the CPU path and images/s of each, no model.
1,024 synthetic JPEGs of DTD's sizes (300-640 px a side), CLIP-336 processor (torchvision backend), `pad`."""
import json, os, sys, tempfile, time

import torch
from transformers import CLIPImageProcessor

from mysproj.bench.eval_clip import synthetic_prepared
from mysproj.bench.synthetic import jpeg_bytes, random_images
from mysproj.evaluation.batches import image_batches
from mysproj.evaluation.device_decode import DeviceBatches, llava_pixels
from mysproj.models.conversation import image_transform

out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1024
dev = "cuda" if torch.cuda.is_available() else "cpu"
processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
tmp = tempfile.mkdtemp()
paths, g = [], torch.Generator().manual_seed(0)
for i in range(256):
    w, h = (int(x) for x in torch.randint(300, 641, (2,), generator=g))
    (raw,) = jpeg_bytes(random_images(1, w, h, seed=i))
    paths.append(os.path.join(tmp, f"{i}.jpg"))
    open(paths[-1], "wb").write(raw)
data, samples = synthetic_prepared(paths, n)
result = {}
for name in ("cpu", "device"):
    for _ in range(2):  # the second pass is timed (workers, cuDNN and nvJPEG warm)
        t0, got = time.perf_counter(), []
        if name == "device":
            batches = DeviceBatches(data, samples, llava_pixels(processor, "pad"), batch_size=32, workers=-1,
                                    device=dev)
            for px, idx in batches:
                got.append(px[:4].cpu() if len(got) < 8 else None)
            if dev == "cuda":
                torch.cuda.synchronize()
        else:
            for px, idx in image_batches(data, samples, image_transform(processor, "pad"), 32, -1):
                got.append(px[:4] if len(got) < 8 else None)
        secs = time.perf_counter() - t0
    result[name] = {"images_per_s": round(len(samples) / secs, 1), "seconds": round(secs, 2),
                    "first": torch.cat([x for x in got if x is not None])}
levels = torch.tensor(processor.image_std)[:, None, None] * 255
diff = ((result["device"].pop("first") - result["cpu"].pop("first")) * levels).abs()
result["pixels_vs_cpu"] = {"mean_levels": round(float(diff.mean()), 4), "max_levels": round(float(diff.max()), 2),
                           "share_differing": round(float((diff > 0.5).float().mean()), 5)}
result["card"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
result["cores"] = os.cpu_count()
print(json.dumps(result))
json.dump(result, open(out, "w"), indent=1)
