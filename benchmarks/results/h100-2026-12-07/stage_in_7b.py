"""Stage-in at the real LLaVA-1.5-7B shapes (random weights): a snapshot in the released layout (fp16 pickled
`.bin` shards, mm_projector.bin, CLIP tower as `pytorch_model.bin`) is staged as HF safetensors by
`mysproj.models.snapshot.stage_llava` in a child process (time, peak RSS); then the staged folder and the snapshot
are loaded on the GPU and compared tensor by tensor and by logits on one prompt with an image.
    python3 stage_in_7b.py WORKDIR OUTDIR"""
import json
import os
import resource
import subprocess
import sys
import time

work, outdir = sys.argv[1], sys.argv[2]
log = open(os.path.join(outdir, "stage_in_7b.log"), "a")


def say(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


if len(sys.argv) > 3 and sys.argv[3] == "stage":
    from mysproj.models.snapshot import stage_llava

    t0 = time.monotonic()
    summary = stage_llava(os.path.join(work, "snapshot"), os.path.join(work, "staged"),
                          tower=os.path.join(work, "snapshot", "vision_tower"))
    say("STAGE", json.dumps({"seconds": round(time.monotonic() - t0, 1),
                             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                             **{k: summary[k] for k in ("tensors", "bytes", "dtype", "files")}}))
    sys.exit(0)

import torch  # noqa: E402

from mysproj.models.loading import load_llava, write_original  # noqa: E402

t0 = time.monotonic()
subprocess.run([sys.executable, "-m", "mysproj.cli", "model", "init", "--preset", "llava-1.5-7b", "--out",
                os.path.join(work, "init")], check=True)
say("INIT", round(time.monotonic() - t0, 1))
t0 = time.monotonic()
m = load_llava(os.path.join(work, "init"))
sd = {k: v.to(torch.float16) for k, v in m.model.state_dict().items()}
write_original(sd, m.model.config, m.tokenizer, m.image_processor, os.path.join(work, "snapshot"), bin_shards=2)
del m, sd
say("SNAPSHOT", round(time.monotonic() - t0, 1), sorted(os.listdir(os.path.join(work, "snapshot"))))
subprocess.run([sys.executable, __file__, work, outdir, "stage"], check=True)
say("DU", subprocess.run(["du", "-sh", os.path.join(work, "snapshot"), os.path.join(work, "staged")],
                         capture_output=True, text=True).stdout.replace("\n", "; "))
t0 = time.monotonic()
a = load_llava(os.path.join(work, "staged"), device="cuda", direct=True)
say("LOAD staged direct", round(time.monotonic() - t0, 1))
t0 = time.monotonic()
b = load_llava(os.path.join(work, "snapshot"), device="cuda",
               vision_tower=os.path.join(work, "snapshot", "vision_tower"))
say("LOAD snapshot", round(time.monotonic() - t0, 1))
sa, sb = a.model.state_dict(), b.model.state_dict()
diff = [k for k in sa if k not in sb or sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
say("TENSORS", len(sa), "differ:", len(diff), diff[:5], "missing:", sorted(set(sb) - set(sa))[:5])
from PIL import Image  # noqa: E402

img = Image.new("RGB", (500, 375), (120, 80, 40))
prompt = "USER: <image>\nWhat texture is this? ASSISTANT:"
outs = []
for x in (a, b):
    inputs = x.image_processor(images=img, return_tensors="pt")["pixel_values"].to("cuda", torch.float16)
    ids = x.tokenizer(prompt.replace("<image>", "<image>" * x.model.config.image_seq_length),
                      return_tensors="pt").input_ids.to("cuda")
    with torch.no_grad():
        outs.append(x.model(input_ids=ids, pixel_values=inputs).logits.float())
say("LOGITS equal:", torch.equal(outs[0], outs[1]), "max abs diff", (outs[0] - outs[1]).abs().max().item())
