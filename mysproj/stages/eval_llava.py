"""`mysproj eval-llava`: LLaVA-1.5 (zero-shot or fine-tuned) on a prepared split, with the training prompt.

Each test record's human turn (the same prompt as training, class order shuffled per example) is wrapped in the
`llava_v1` template; images are padded to square with the CLIP mean (LLaVA-1.5 `pad`). Batches are left-padded.

mode `generate` (the paper's protocol): greedy decoding of at most `max_new_tokens` (`static_decode`: mysproj's
own loop, `mysproj.evaluation.greedy`, the same tokens as transformers' `generate`), then the answer parser
(exact / contained / close match / unparsed, spec §6.5). mode `scoring`: the class whose answer " <label></s>"
has the highest log-likelihood after the prompt (never unparsed; see `mysproj.evaluation.scoring`).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    from mysproj.models import compile_cache
    from mysproj.storage.manifest import run_stage

    return run_stage("eval-llava", cfg,
                     lambda out: compile_cache.run_with(compile_cache_uri(cfg), lambda: _body(cfg, out)))


def compile_cache_uri(cfg) -> str | None:
    """`cfg.compile_cache` where this run compiles anything (GPUs: scoring's layers, generate's prefill)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prefill = cfg.mode == "generate" and cfg.static_decode and cfg.compile_prefill and dev == "cuda"
    return cfg.compile_cache if compiles(cfg, dev) or prefill else None


def _pixels(img, processor, aspect):
    from mysproj.models.conversation import pixel_values

    return pixel_values([img], processor, aspect)[0]


def dtype_for(precision: str, dev: str):
    import torch

    if precision == "auto":
        return torch.float16 if dev == "cuda" else torch.float32  # fp16 as LLaVA's own inference
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def compiles(cfg, dev: str) -> bool:
    """Compiled layers for scoring on a GPU only: for `generate` they were no faster on an H200 (36.6 vs 36.2
    images/s, decode steps are launch-bound) and greedy decoding of a random model flipped 9% of the answers on
    the last-bit differences, so generate stays eager."""
    return cfg.compile and dev == "cuda" and cfg.mode == "scoring"


def scoring_forward(cfg, model, dev: str):
    """The scoring mode's SharedPrefixForward (`score_continuations(..., fast=)`), or None."""
    from mysproj.models.shared_prefix import SharedPrefixForward

    if cfg.mode != "scoring" or not cfg.shared_prefix:
        return None
    model.requires_grad_(False)  # evaluation trains nothing; the kept prefix keys and values rely on it
    if not SharedPrefixForward.supports(model):
        return None
    return SharedPrefixForward(model, compile=compiles(cfg, dev))


def greedy_decoder(cfg, model, dev: str, tokenizer):
    """The generate mode's GreedyDecoder (`static_decode`), or None where transformers' generate runs."""
    from mysproj.evaluation.greedy import GreedyDecoder, unsupported

    if cfg.mode != "generate" or not cfg.static_decode:
        return None
    model.requires_grad_(False)  # evaluation trains nothing; the kept prefix keys and values rely on it
    why = unsupported(model)
    if why:
        log.info("eval-llava: transformers' generate decodes (%s)", why)
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GreedyDecoder(model, eos_id=tokenizer.eos_token_id, pad_id=pad_id, max_rows=cfg.batch_size,
                         cuda_graphs=cfg.cuda_graphs, compile_prefill=cfg.compile_prefill and dev == "cuda")


def generate_answers(model, tokenizer, prompts: list[list[int]], pixel_values, max_new_tokens: int, pad_id: int,
                     decoder=None) -> list[str]:
    """Greedy answers for prompt ids: from `decoder` (a GreedyDecoder) or transformers' generate."""
    from mysproj.evaluation.scoring import left_pad

    if decoder is not None:
        return tokenizer.batch_decode(decoder(prompts, pixel_values, max_new_tokens), skip_special_tokens=True)
    return generate(model, left_pad(prompts, pad_id, pixel_values.device), pixel_values, max_new_tokens, pad_id,
                    tokenizer)


def examples(data, split: str, limit: int | None):
    """(samples, human prompts) in the order of `llava_<split>.json`."""
    from mysproj.errors import BadInput

    by_image = {s.image: s for s in data.samples(split)}
    records = data.llava_records(split)[: limit or None]
    samples, humans = [], []
    for r in records:
        s = by_image.get(r["image"])
        if s is None:
            raise BadInput(f"{data.uri}: llava_{split}.json names {r['image']}, which samples.parquet does not list; "
                           f"re-run prep")
        samples.append(s)
        humans.append(next(t["value"] for t in r["conversations"] if t["from"] == "human"))
    if not samples:
        raise BadInput(f"{data.uri}: split '{split}' has no examples")
    return samples, humans


def _body(cfg, out) -> dict:
    import torch

    from mysproj.data.prepared import PreparedData
    from mysproj.evaluation import scoring
    from mysproj.evaluation.answers import AnswerParser
    from mysproj.evaluation.batches import Throughput, image_batches, write_predictions
    from mysproj.evaluation.batches import device as pick_device
    from mysproj.evaluation.metrics import classification_metrics, short
    from mysproj.models import speedups
    from mysproj.models.conversation import llava_v1_prompt
    from mysproj.models.loading import load_llava
    from mysproj.models.prompt_ids import prompt_ids
    from mysproj.progress import Progress
    from mysproj.storage.stage_time import processed

    data = PreparedData(cfg.data)
    samples, humans = examples(data, cfg.split, cfg.limit)
    dev = pick_device()
    loaded = load_llava(cfg.model, device=dev, dtype=dtype_for(cfg.precision, dev), direct=cfg.direct_load)
    model, tok = loaded.model, loaded.tokenizer
    speedups.apply(model, fp8=cfg.fp8, compile=compiles(cfg, dev))
    fast = scoring_forward(cfg, model, dev)
    decoder = greedy_decoder(cfg, model, dev, tok)
    image_token, n_image = model.config.image_token_id, model.config.image_seq_length
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    conts = [scoring.continuation_ids(tok, c) for c in data.classes]
    parser = AnswerParser(data.classes, cfg.close_match)
    log.info("eval-llava: %d examples, %d classes, mode %s, %s weights on %s", len(samples), len(data.classes),
             cfg.mode, "random" if loaded.random_weights else "loaded", dev)

    transform = functools.partial(_pixels, processor=loaded.image_processor, aspect=cfg.image_aspect_ratio)
    rows: list[dict] = []
    progress = Progress(f"eval-llava {cfg.mode}", len(samples), "images")
    speed = Throughput()
    for pixels, idx in image_batches(data, samples, transform, cfg.batch_size, cfg.workers):
        pix = torch.stack(pixels).to(dev, model.dtype)
        prompts = [prompt_ids(tok, llava_v1_prompt(humans[i]), image_token, n_image) for i in idx]
        if cfg.mode == "generate":
            answers = generate_answers(model, tok, prompts, pix, cfg.max_new_tokens, pad_id, decoder)
            for i, answer in zip(idx, answers):
                parsed = parser(answer)
                rows.append(_row(samples[i], parsed.label, answer=answer, how=parsed.how))
        else:
            scores, _ = scoring.score_continuations(model, scoring.left_pad(prompts, pad_id, dev), pix, conts, fast)
            for i, sc in zip(idx, scores.cpu()):
                rows.append(_row(samples[i], data.classes[int(sc.argmax())], scores=[float(v) for v in sc]))
        progress.update(len(idx))
        speed.batch_done(len(idx))
    metrics = classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], data.classes)
    metrics.update(mode=cfg.mode, model=cfg.model, split=cfg.split, random_weights=loaded.random_weights,
                   precision=str(model.dtype).split(".")[-1], fp8=cfg.fp8)
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-llava: %s", short(metrics))
    rates = speed.summary()
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "unparsed": metrics["unparsed"],
            "n": metrics["n"], **rates, "processed": processed(len(rows), "images", rates["images_per_s"]),
            "device": dev, "shared_prefix": fast is not None,
            **({"static_decode": decoder.stats, "cuda_graphs": decoder.cuda_graphs} if decoder else {})}


def _row(sample, prediction, **extra) -> dict:
    return {"image": sample.image, "label": sample.label, "prediction": prediction,
            "correct": prediction == sample.label, **extra}


def generate(model, batch, pixel_values, max_new_tokens: int, pad_id: int, tokenizer) -> list[str]:
    """Greedy answers (text after the prompt, special tokens dropped) for a left-padded batch."""
    import torch
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                               eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=pixel_values, generation_config=gen_cfg)
    return tokenizer.batch_decode(ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
