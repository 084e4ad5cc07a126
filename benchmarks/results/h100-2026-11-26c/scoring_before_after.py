"""Same card, same process: scoring before (every continuation token fed, </s> included) and after (</s> not fed)."""
import sys, torch
# first: git show 913b17b:mysproj/evaluation/scoring.py > (this folder)/scoring_old.py
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from types import SimpleNamespace
import scoring_old
from mysproj.bench import eval_llava as E, synthetic
from mysproj.evaluation.scoring import score_continuations
from mysproj.models import speedups
args = SimpleNamespace(preset="llava-1.5-7b", seed=0, device="cuda")
model, tok = E.build_model(args, torch.float16)
layout = synthetic.TokenLayout.with_text(120)
conts = E._continuations(tok, 47)
batch = E.prompt_batch(model.config, layout, 64, 0, "cuda", tok.pad_token_id or tok.eos_token_id)
pix = synthetic.pixel_batch(model.config, 64, seed=0).to("cuda", torch.float16)
speedups.apply(model, fp8=False, compile=True)
def timed(fn):
    for _ in range(3): out = fn(model, batch, pix, conts)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(5): fn(model, batch, pix, conts)
    e.record(); torch.cuda.synchronize(); return out[0], 64 / (s.elapsed_time(e) / 5) * 1000
for rnd in range(2):
    old, r_old = timed(scoring_old.score_continuations)
    new, r_new = timed(score_continuations)
    print(f"round {rnd}: old {r_old:.2f} images/s, new {r_new:.2f} images/s ({r_new / r_old:.3f}x); "
          f"same class {(old.argmax(-1) == new.argmax(-1)).float().mean().item():.4f}; "
          f"max |score diff| {(old - new).abs().max().item():.4f} (scores ~{old.abs().mean().item():.1f})")
