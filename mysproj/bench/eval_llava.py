"""`mysproj bench eval-llava`: zero-shot classification with LLaVA, one batch of images per timed step.

ours: the eval-llava stage's batch functions on a random-weight model in the stage's dtype: `generate` (greedy,
`--new-tokens`, then answer decoding; the stage's `static_decode` loop unless `--set static-decode=false`) or
`scoring` (the prompt prefix once, all class continuations after it,
`mysproj.evaluation.scoring.score_continuations`). Inputs are what the stage's loader hands them: left-padded
prompt ids (`--prompt-tokens` text tokens around the 576 image tokens) and preprocessed pixels; decode is measured
by eval-clip / probe-features. baseline: plain `model.generate(max_new_tokens=--new-tokens)` in bf16 at batch 1
(how the released code's cli.py is used) and at `--batch-size`.

The random model's `</s>` row of lm_head is zeroed (logit exactly 0, below the maximum of the other random
logits) so every answer is exactly `--new-tokens` long, as the measured shape requires, in ours and baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from mysproj.bench import flops as F
from mysproj.bench import synthetic
from mysproj.bench.command import ours_config
from mysproj.bench.eval_clip import class_names
from mysproj.bench.measurement import BenchReport, Measurement, card_name
from mysproj.bench.timing import free_memory, time_steps
from mysproj.evaluation.scoring import continuation_ids, left_pad, score_continuations
from mysproj.models.presets import build_random_llava
from mysproj.speed import llava as speed
from mysproj.stages.eval_llava import generate_answers

log = logging.getLogger("mysproj.bench")


def build_model(args, dtype):
    """(model, tokenizer): the preset with random weights on the card, `</s>` never the greedy choice."""

    model, tokenizer, _ = build_random_llava(args.preset, seed=args.seed, dtype=str(dtype).split(".")[-1],
                                             device=args.device)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    return model.eval(), tokenizer


def prompt_batch(config, layout, batch: int, seed: int, device: str, pad_id: int):
    """The stage's left-padded `Batch` over synthetic prompt ids laid out like llava_v1 prompts."""

    ids = synthetic.token_batch(config, layout, batch, seed=seed)["input_ids"]
    return left_pad(ids.tolist(), pad_id, device)


def eval_config(args):
    return ours_config("eval-llava", {"model": "bench:random", "data": "bench:synthetic", "out": "bench:none",
                                      "mode": args.mode, "batch_size": args.batch_size,
                                      "max_new_tokens": args.new_tokens}, args)


def run(args) -> BenchReport:
    cfg = eval_config(args)
    layout = synthetic.TokenLayout.with_text(args.prompt_tokens)
    dtype = speed.dtype_for(cfg.precision, args.device)
    model, tok = build_model(args, dtype)
    dims = F.LlavaDims.from_config(model.config)
    conts = _continuations(tok, args.classes)
    if args.mode == "generate":
        flops = F.llava_generate(dims, prompt_text_tokens=layout.text, new_tokens=args.new_tokens)
    else:
        mean_len = sum(len(c) for c in conts) / len(conts)
        flops = F.llava_scoring(dims, prompt_text_tokens=layout.text, n_classes=len(conts), label_tokens=mean_len)
    settings = {"mode": args.mode, "prompt_text_tokens": layout.text, "image_tokens": dims.image_tokens,
                "new_tokens": args.new_tokens, "classes": len(conts), "dtype": str(dtype).split(".")[-1],
                "continuation_tokens": sum(len(c) for c in conts), "fp8": cfg.fp8,
                "compile": speed.eval_compiles(cfg, args.device)}
    ours = _ours(args, cfg, model, tok, layout, conts, dtype)
    measurements = [ours]
    del model
    free_memory(args.device)
    if args.baseline:
        measurements += _baseline(args, layout)
        free_memory(args.device)
    for m in measurements:
        m.flops_per_item = (flops if m.variant == "ours" else F.llava_generate(
            dims, prompt_text_tokens=layout.text, new_tokens=args.new_tokens))["total"]
    return BenchReport("eval-llava", args.preset, args.device, card_name(args.device), args.peak_tflops, settings,
                       flops, measurements)


def _continuations(tokenizer, n: int) -> list[list[int]]:
    return [continuation_ids(tokenizer, name) for name in class_names(n)]


def _ours(args, cfg, model, tok, layout, conts, dtype) -> Measurement:
    """The stage's batch step; with fp8/compile on, the same batch's answers are first taken from the model as
    loaded, and the share of answers the faster model reproduces is reported (`same_answers`)."""

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = prompt_batch(model.config, layout, args.batch_size, args.seed, args.device, pad_id)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids.cpu(), batch.attention_mask.cpu())]
    pixels = synthetic.pixel_batch(model.config, args.batch_size, seed=args.seed).to(args.device, dtype)

    def answer(paths):
        if args.mode == "generate":
            return generate_answers(model, tok, prompts, pixels, args.new_tokens, pad_id, paths.decoder)
        scores, _ = score_continuations(model, batch, pixels, conts, paths.fast)
        return scores.argmax(-1).tolist()

    compile = speed.eval_compiles(cfg, args.device)
    faster = cfg.fp8 or compile or (cfg.shared_prefix if args.mode == "scoring" else cfg.static_decode)
    # the reference answers come from the model as loaded, through transformers' generate
    reference = answer(speed.EvalPaths({})) if faster else None
    paths = speed.for_eval(cfg, model, tok, args.device)
    fast, decoder = paths.fast, paths.decoder
    answers = []
    timing = time_steps(lambda _: answers.append(answer(paths)), device=args.device, warmup=args.warmup,
                        steps=args.steps, profile=args.profile)
    what = ("stage eval_llava.generate (greedy, answers decoded)" if args.mode == "generate"
            else "evaluation.scoring.score_continuations (shared prefix, all classes in one pass)")
    static = decoder is not None
    prefill = static and speed.prefill_compiles(cfg, args.device)
    what += "".join(f", {k}" for k, on in (("fp8 LLM", cfg.fp8), ("compiled layers", compile),
                                           ("shared_prefix", fast is not None), ("static_decode", static),
                                           ("CUDA graphs", static and decoder.cuda_graphs),
                                           ("compiled prefill", prefill)) if on)
    # equal digests in two runs = the same answers (e.g. with and without CUDA graphs)
    digest = hashlib.sha256(json.dumps(answers[-1]).encode()).hexdigest()[:16]
    extra = {"answers_per_step": len(answers[-1]), **paths.layers, **({"decoder": decoder.stats} if decoder else {}),
             "answers_sha256": digest}
    if reference is not None:
        extra["same_answers"] = round(sum(a == b for a, b in zip(reference, answers[-1])) / len(reference), 4)
    return Measurement("ours", what, args.batch_size, args.batch_size, timing, 0.0, unit="images", extra=extra)


def _baseline(args, layout) -> list[Measurement]:
    model, tok = build_model(args, torch.bfloat16 if args.device == "cuda" else torch.float32)
    return [_plain_generate(args, model, tok.pad_token_id, layout, variant, b)
            for variant, b in (("baseline-b1", 1), ("baseline", args.batch_size))]


def _plain_generate(args, model, pad_id: int, layout, variant: str, b: int) -> Measurement:
    batch = prompt_batch(model.config, layout, b, args.seed, args.device, pad_id)
    pixels = synthetic.pixel_batch(model.config, b, seed=args.seed).to(args.device, model.dtype)
    lengths = []

    def step(_):
        with torch.no_grad():
            ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=pixels, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=pad_id)
        lengths.append(ids.shape[1] - batch.input_ids.shape[1])

    timing = time_steps(step, device=args.device, warmup=min(args.warmup, 2), steps=args.steps)
    return Measurement(variant, f"transformers model.generate, batch {b}, {str(model.dtype).split('.')[-1]}",
                       b, b, timing, 0.0, unit="images", extra={"generated_tokens": lengths[-1]})
