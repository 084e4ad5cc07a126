"""The whole job's model I/O on one machine, stage by stage: `model init` of a preset, `merge` with and without
`reuse_base`, and loading the merged model onto the GPU with and without `direct_load` and as the probe does
(`vision_only`). Prints one JSON line per measurement (stage seconds as the manifest records them) and removes
what it wrote.

    python -m mysproj.bench.stage_io --preset llava-1.5-7b --root /tmp/stage-io
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from mysproj.config.registry import summary_of
from mysproj.models.conversion import PROJECTOR_HF_TO_ORIGINAL
from mysproj.models.loading import load_llava
from mysproj.models.vision_only import load_vision
from mysproj.stages.registry import run, stage_config


def _projector_file(base: str, path: str) -> None:
    """A bare mm_projector.bin of the base's shapes (random values, the base's dtype)."""

    state = load_vision(base).model.state_dict()  # the projector's shapes and dtype, without reading the LLM
    g = torch.Generator().manual_seed(0)
    torch.save({PROJECTOR_HF_TO_ORIGINAL[k]: (0.02 * torch.randn(state[k].shape, generator=g)).to(state[k].dtype)
                for k in PROJECTOR_HF_TO_ORIGINAL}, path)


def _stage(name: str, **fields) -> dict:
    manifest = run(name, stage_config(name, fields, env=os.environ))
    return {"stage": name, **{k: v for k, v in fields.items() if k not in ("out", "base", "projector")},
            "seconds": summary_of(manifest).seconds, "reused": summary_of(manifest).get("reused")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--root", required=True, help="a scratch folder (removed afterwards)")
    args = p.parse_args(argv)
    root = args.root.rstrip("/")
    try:
        print(json.dumps(_stage("model-init", preset=args.preset, out=f"{root}/base")), flush=True)
        _projector_file(f"{root}/base", f"{root}/mm_projector.bin")
        for reuse in (True, False):
            print(json.dumps(_stage("merge", base=f"{root}/base", projector=f"{root}/mm_projector.bin",
                                    out=f"{root}/merge-{reuse}", reuse_base=reuse)), flush=True)
        if torch.cuda.is_available():
            for direct in (False, True, False, True):  # twice each: the first pair also warms the page cache
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model = load_llava(f"{root}/merge-True", device="cuda", dtype=torch.float16, direct=direct).model
                torch.cuda.synchronize()
                print(json.dumps({"load": "eval-llava's", "direct_load": direct,
                                  "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
                del model
                torch.cuda.empty_cache()

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model = load_vision(f"{root}/merge-True", device="cuda", dtype=torch.float16).model
            torch.cuda.synchronize()
            print(json.dumps({"load": "probe's", "vision_only": True, "seconds": round(time.perf_counter() - t0, 2)}),
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
