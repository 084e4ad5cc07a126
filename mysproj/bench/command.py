"""`mysproj bench {finetune,eval-llava,eval-clip,probe-features}`: throughput, MFU and peak memory of the
project's real stage code on random-weight presets and synthetic inputs, optionally beside the plain-transformers
baseline in the same process on the same card (`--baseline`). The results table is printed last; `--json-out`
writes the same numbers as JSON (a local path or any fsspec URI).

    mysproj bench finetune --preset llava-1.5-7b --strategy full --baseline --json-out bench-ft.json
    mysproj bench eval-llava --preset llava-1.5-7b --mode scoring --batch-size 64 --baseline
    mysproj bench finetune --preset tiny --device cpu --steps 3 --warmup 1        # seconds, on a laptop
Method and FLOP formulas: docs/performance.md. `mysproj bench pipeline` times the whole job
instead (`mysproj.bench.pipeline`; docs/performance.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os

from mysproj.bench import pipeline, weights
from mysproj.bench.flops import DEFAULT_PEAK_TFLOPS
from mysproj.errors import BadInput
from mysproj.stages.registry import stage_config
from mysproj.storage import write_bytes

log = logging.getLogger("mysproj.bench")

# sub-benchmark -> (module with `run(args) -> BenchReport`, default batch size)
BENCHMARKS = {
    "finetune": ("mysproj.bench.finetune", 16),
    "eval-llava": ("mysproj.bench.eval_llava", 64),
    "eval-clip": ("mysproj.bench.eval_clip", 256),
    "probe-features": ("mysproj.bench.probe_features", 64),
}
PRESETS = ("tiny", "llava-1.5-7b")


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("bench", help="measure throughput/MFU of the stages (and the plain-transformers baseline)",
                       description=__doc__.split("\n\n")[0])
    bsub = p.add_subparsers(dest="bench", required=True, parser_class=parser_class)
    for name in BENCHMARKS:
        add_arguments(bsub.add_parser(name, help=f"benchmark {name}"), name)
    p.set_defaults(func=run)

    pipeline.add_arguments(bsub.add_parser("pipeline", help="the whole job on a dataset-shaped fixture, timed "
                                                            "stage by stage", description=pipeline.__doc__))

    weights.add_arguments(bsub.add_parser("weights", help="GB/s of a model's weights bucket -> host memory -> GPU "
                                                          "(and the upload)", description=weights.__doc__))


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--preset", choices=PRESETS, default="llava-1.5-7b",
                   help="model size: llava-1.5-7b (with CLIP ViT-L-14-336 for eval-clip) or tiny (CPU tests)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"per-device batch (default {BENCHMARKS[name][1]})")
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--baseline", action="store_true",
                   help="also time the plain-transformers version of the same work and print the ratio")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this path/URI")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="per-card dense bf16 peak in TFLOP/s for MFU (default: a Hopper card's matmul ceiling)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of ours: device time by kind (gemm, attention, fused, ...) and the "
                        "top kernels, printed and in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", type=_field_value, metavar="FIELD=VALUE",
                   help="a config field of the stage measured, for ours, e.g. --set deepspeed=none "
                        "--set gradient-checkpointing=false (finetune), --set fp8=true (eval-llava); repeatable")
    if name == "finetune":
        p.add_argument("--strategy", choices=("projector", "full"), default="projector")
        p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample beside the image")
        p.add_argument("--answer-tokens", type=int, default=5, help="supervised tokens (label + </s>)")
    if name == "eval-llava":
        p.add_argument("--mode", choices=("generate", "scoring"), default="generate")
        p.add_argument("--prompt-tokens", type=int, default=120, help="text tokens of the prompt")
        p.add_argument("--new-tokens", type=int, default=16, help="generated tokens (generate mode)")
        p.add_argument("--classes", type=int, default=47, help="candidate classes (scoring mode; DTD has 47)")
    if name in ("eval-clip", "probe-features"):
        p.add_argument("--image-px", default="500x375", help="synthetic JPEG size WxH (decode cost)")
    if name == "eval-clip":
        p.add_argument("--classes", type=int, default=47, help="candidate classes (DTD has 47)")
        p.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
        p.add_argument("--baseline-images", type=int, default=None,
                       help="images the one-at-a-time baseline runs (default: 2 batches' worth, at least 32)")


def _field_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE")
    field, value = text.split("=", 1)
    return field.strip().lstrip("-").replace("-", "_"), value


def ours_config(stage: str, fields: dict, args: argparse.Namespace):
    """The config of the stage measured, for ours: `fields` with the `--set FIELD=VALUE` values on top."""

    return stage_config(stage, {**fields, **dict(args.set or [])})


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on the machine or the benchmark."""
    import torch  # noqa: PLC0415 - torch: only once a benchmark runs (the CLI imports this module for its arguments)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device visible; pass --device cpu")
    if args.batch_size is None:
        args.batch_size = BENCHMARKS[args.bench][1]
    for flag in ("batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise BadInput("--warmup must be >= 0")
    if hasattr(args, "image_px"):
        try:
            w, h = (int(x) for x in args.image_px.lower().split("x"))
        except ValueError:
            raise BadInput(f"--image-px {args.image_px!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
        if w < 1 or h < 1:
            raise BadInput(f"--image-px {args.image_px!r}: width and height must be >= 1")
        args.image_wh = (w, h)
    return args


def run(args: argparse.Namespace) -> int:
    resolve(args)
    module = importlib.import_module(BENCHMARKS[args.bench][0])
    report = module.run(args)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return 0
    text = report.to_json()
    if args.json_out:
        write_bytes(args.json_out, text.encode())
        log.info("bench: wrote %s", args.json_out)
    print(report.table())
    return 0
