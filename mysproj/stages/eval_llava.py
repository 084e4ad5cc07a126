"""`mysproj eval-llava`: LLaVA-1.5 (zero-shot or fine-tuned) on a prepared split, with the training prompt.

Each test record's human turn (the same prompt as training, class order shuffled per example) is wrapped in the
`llava_v1` template; images are padded to square with the CLIP mean (LLaVA-1.5 `pad`). Batches are left-padded.

mode `generate` (the paper's protocol): greedy decoding of at most `max_new_tokens` (`static_decode`: mysproj's
own loop, `mysproj.evaluation.greedy`, the same tokens as transformers' `generate`), then the answer parser
(exact / contained / close match / unparsed, spec §6.5). mode `scoring`: the class whose answer " <label></s>"
has the highest log-likelihood after the prompt (never unparsed; see `mysproj.evaluation.scoring`). Loading and
the speed paths (precision, fp8, compiled layers, shared_prefix, static_decode) are `mysproj.speed.llava`'s.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    from mysproj.models import compile_cache
    from mysproj.speed import llava as speed
    from mysproj.storage.manifest import run_stage

    cache = speed.eval_compile_cache(cfg)
    return run_stage("eval-llava", cfg, lambda out: compile_cache.run_with(cache, lambda: _body(cfg, out)))


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
    from mysproj.evaluation.batches import image_batches
    from mysproj.evaluation.metrics import classification_metrics, short
    from mysproj.evaluation.predictions import write_predictions
    from mysproj.evaluation.throughput import Throughput
    from mysproj.models.conversation import image_transform, llava_v1_prompt
    from mysproj.models.prompt_ids import prompt_ids
    from mysproj.progress import Progress
    from mysproj.speed import llava as speed
    from mysproj.speed.device import inference_device
    from mysproj.storage.stage_time import processed
    from mysproj.tracking import stage_metrics

    data = PreparedData(cfg.data)
    samples, humans = examples(data, cfg.split, cfg.limit)
    dev = inference_device()
    loaded = speed.load(cfg, dev)
    model, tok = loaded.model, loaded.tokenizer
    paths = speed.for_eval(cfg, model, tok, dev)
    image_token, n_image = model.config.image_token_id, model.config.image_seq_length
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    conts = [scoring.continuation_ids(tok, c) for c in data.classes]
    parser = AnswerParser(data.classes, cfg.close_match)
    log.info("eval-llava: %d examples, %d classes, mode %s, %s weights on %s", len(samples), len(data.classes),
             cfg.mode, "random" if loaded.random_weights else "loaded", dev)

    transform = image_transform(loaded.image_processor, cfg.image_aspect_ratio)
    rows: list[dict] = []
    progress = Progress(f"eval-llava {cfg.mode}", len(samples), "images")
    rate = Throughput()
    for pixels, idx in image_batches(data, samples, transform, cfg.batch_size, cfg.workers):
        pix = torch.stack(pixels).to(dev, model.dtype)
        prompts = [prompt_ids(tok, llava_v1_prompt(humans[i]), image_token, n_image) for i in idx]
        if cfg.mode == "generate":
            answers = generate_answers(model, tok, prompts, pix, cfg.max_new_tokens, pad_id, paths.decoder)
            for i, answer in zip(idx, answers):
                parsed = parser(answer)
                rows.append(_row(samples[i], parsed.label, answer=answer, how=parsed.how))
        else:
            scores, _ = scoring.score_continuations(model, scoring.left_pad(prompts, pad_id, dev), pix, conts,
                                                    paths.fast)
            for i, sc in zip(idx, scores.cpu()):
                rows.append(_row(samples[i], data.classes[int(sc.argmax())], scores=[float(v) for v in sc]))
        progress.update(len(idx))
        rate.batch_done(len(idx))
    metrics = classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], data.classes)
    metrics.update(mode=cfg.mode, model=cfg.model, split=cfg.split, random_weights=loaded.random_weights,
                   precision=str(model.dtype).split(".")[-1], fp8=cfg.fp8)
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-llava: %s", short(metrics))
    tracked = stage_metrics(cfg, out, "eval-llava",
                            {f"eval/{k}": metrics[k] for k in ("macro_f1", "accuracy", "unparsed")})
    rates = rate.summary()
    return {**tracked, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "unparsed": metrics["unparsed"], "n": metrics["n"], **rates,
            "processed": processed(len(rows), "images", rates["images_per_s"]), "device": dev, **paths.summary()}


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
