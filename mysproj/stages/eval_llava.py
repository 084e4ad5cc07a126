"""`mysproj eval-llava`: LLaVA-1.5 (zero-shot or fine-tuned) on a prepared split, with the training prompt.

Each test record's human turn (the same prompt as training, class order shuffled per example) is wrapped in the
`llava_v1` template; images are padded to square with the CLIP mean (LLaVA-1.5 `pad`). Batches are left-padded.

mode `generate` (the paper's protocol): greedy decoding of at most `max_new_tokens` (`static_decode`: mysproj's
own loop, `mysproj.evaluation.greedy`, the same tokens as transformers' `generate`), or sampling at `temperature`
as the released `cli.py` (`mysproj.evaluation.decoding`), then the answer parser (exact / contained / close match /
unparsed). mode `scoring`: the class whose answer " <label></s>"
has the highest log-likelihood after the prompt (never unparsed; see `mysproj.evaluation.scoring`). Loading and
the speed paths (precision, fp8, compiled layers, shared_prefix, static_decode) are `mysproj.speed.llava`'s.
"""

from __future__ import annotations

import logging

from mysproj.data.prepared import PreparedData
from mysproj.errors import BadInput
from mysproj.evaluation import decoding, scoring
from mysproj.evaluation.answers import AnswerParser
from mysproj.evaluation.metrics import classification_metrics, short
from mysproj.evaluation.predictions import write_predictions
from mysproj.evaluation.throughput import Throughput
from mysproj.models import compile_cache
from mysproj.models.conversation import llava_v1_prompt
from mysproj.models.prompt_ids import prompt_ids
from mysproj.progress import Progress
from mysproj.speed import llava as speed
from mysproj.speed.device import inference_device
from mysproj.storage.manifest import run_stage
from mysproj.storage.stage_time import processed
from mysproj.tracking import stage_metrics

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    cache = speed.eval_compile_cache(cfg)
    return run_stage("eval-llava", cfg, lambda out: compile_cache.run_with(cache, lambda: _body(cfg, out)))


def generate_answers(model, tokenizer, prompts: list[list[int]], pixel_values, max_new_tokens: int, pad_id: int,
                     decoder=None, *, temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                     stop=None) -> list[str]:
    """Answers for prompt ids: greedy from `decoder` (a GreedyDecoder) or transformers' generate, which also samples
    (`temperature` > 0). `stop`: a `decoding.NewlineStop`, whose answers are cut at their first line."""

    if decoder is not None and temperature == 0:
        answers = tokenizer.batch_decode(decoder(prompts, pixel_values, max_new_tokens, stop),
                                         skip_special_tokens=True)
    else:
        answers = decoding.generate(model, scoring.left_pad(prompts, pad_id, pixel_values.device), pixel_values,
                                    max_new_tokens, pad_id, tokenizer, temperature=temperature, top_p=top_p,
                                    seed=seed, stop=stop)
    return [decoding.first_line(a) for a in answers] if stop is not None else answers


def examples(data, split: str, limit: int | None):
    """(samples, human prompts) in the order of `llava_<split>.json`."""

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
    stop_rule = decoding.resolve_stop(cfg)
    stop = decoding.NewlineStop(tok) if cfg.mode == "generate" and stop_rule == "newline" else None
    sampled = decoding.samples(cfg)
    log.info("eval-llava: %d examples, %d classes, mode %s (%s), %s weights on %s", len(samples), len(data.classes),
             cfg.mode, _decoding_text(cfg, stop_rule), "random" if loaded.random_weights else "loaded", dev)

    longest = max(range(len(humans)), key=lambda i: len(humans[i]))
    check_context(model.config, len(prompt_ids(tok, llava_v1_prompt(humans[longest]), image_token, n_image)),
                  cfg.max_new_tokens if cfg.mode == "generate" else max(len(c) for c in conts), samples[longest])

    rows: list[dict] = []
    progress = Progress(f"eval-llava {cfg.mode}", len(samples), "images")
    rate = Throughput()
    batches = speed.pixel_batches(cfg, loaded.image_processor, data, samples, dev, model.dtype)
    for pix, idx in batches:
        prompts = [prompt_ids(tok, llava_v1_prompt(humans[i]), image_token, n_image) for i in idx]
        if cfg.mode == "generate":
            answers = generate_answers(model, tok, prompts, pix, cfg.max_new_tokens, pad_id, paths.decoder,
                                       temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
                                       seed=cfg.seed * 1_000_003 + idx[0] if sampled else None)
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
                   precision=str(model.dtype).split(".")[-1], fp8=cfg.fp8, decode=cfg.decode,
                   device_decoded_images=batches.device_images)
    if cfg.mode == "generate":
        metrics.update(decoding=_decoding_text(cfg, stop_rule), temperature=cfg.temperature, top_p=cfg.top_p,
                       max_new_tokens=cfg.max_new_tokens, stop=stop_rule, seed=cfg.seed if sampled else None)
    out.write_json("metrics.json", metrics)
    write_predictions(out, rows)
    log.info("eval-llava: %s", short(metrics))
    tracked = stage_metrics(cfg, out, "eval-llava",
                            {f"eval/{k}": metrics[k] for k in ("macro_f1", "accuracy", "unparsed")})
    rates = rate.summary()
    return {**tracked, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "unparsed": metrics["unparsed"], "n": metrics["n"], **rates,
            "processed": processed(len(rows), "images", rates["images_per_s"]), "device": dev,
            "device_decoded_images": batches.device_images, **paths.summary()}


def _decoding_text(cfg, stop_rule: str) -> str:
    """How answers were decoded, in words (the log, metrics.json)."""
    if cfg.mode != "generate":
        return "scoring"
    how = (f"sampled at temperature {cfg.temperature:g}" + (f", top-p {cfg.top_p:g}" if cfg.top_p is not None else "")
           + f", seed {cfg.seed}") if cfg.temperature > 0 else "greedy"
    return f"{how}, at most {cfg.max_new_tokens} new tokens, stop at " + ("a line break" if stop_rule == "newline"
                                                                          else "`</s>`")


def _row(sample, prediction, **extra) -> dict:
    return {"image": sample.image, "label": sample.label, "prediction": prediction,
            "correct": prediction == sample.label, **extra}


def check_context(config, prompt_tokens: int, answer_tokens: int, sample) -> None:
    """`BadInput` before any image is read when the longest prompt (the image's tokens expanded) and the answer it
    may get do not fit the model's context: positions past it would be garbage, not an error."""
    context = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    if context and prompt_tokens + answer_tokens > context:
        raise BadInput(f"eval-llava: the prompt of {sample.image} is {prompt_tokens} tokens "
                       f"(the image's included) and its answer up to {answer_tokens}, over the model's context of "
                       f"{context}; lower --max-new-tokens, or shorten the prompt (fewer classes, a shorter --task)")


def generate(model, batch, pixel_values, max_new_tokens: int, pad_id: int, tokenizer) -> list[str]:
    """Greedy answers of transformers' generate for a left-padded batch (`decoding.generate`)."""

    return decoding.generate(model, batch, pixel_values, max_new_tokens, pad_id, tokenizer)
