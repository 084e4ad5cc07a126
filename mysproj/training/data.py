"""Fine-tuning data: the prep output's LLaVA records as token ids + images, and the step-wise data order.

The order is a pure function of (seed, epoch): a restarted job recomputes it and skips the steps already done,
so it sees exactly the batches an uninterrupted job would. Every optimizer step consumes `global_batch` samples,
split evenly over ranks and micro-batches; the epoch's last step is filled up with samples from the start of the
order whose labels are masked (they add no loss and no gradient, and keep every rank's micro-batch count equal),
or (`fill="repeat"`, as accelerate's `even_batches`) that count like any other. `lengths` groups each step's
samples into micro-batches of similar length, as LLaVA's `group_by_modality_length`.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mysproj.data.images import open_rgb
from mysproj.errors import BadInput
from mysproj.models.conversation import IGNORE_INDEX, pixel_values, training_example

log = logging.getLogger("mysproj.finetune")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image_path: str
    mismatch: tuple[int, int] | None = None  # preprocess_v1's tokenization mismatch: labels all masked
    truncated: int = 0  # tokens cut off the end (model_max_length)
    words: int = 0  # LLaVA's modality length: the words of the conversation's turns (what group_by_length sorts)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def load_examples(data, tokenizer, model_config, *, conv: str, max_length: int, split: str = "train") -> list[Example]:
    """Tokenised examples from a `PreparedData`; every answer must be one of its classes. Examples whose labels
    LLaVA's `preprocess_v1` would mis-count stay in the data with no supervised token (as upstream keeps them),
    and one warning says how many."""
    records = data.llava_records(split)
    if not records:
        raise BadInput(f"{data.uri}: llava_{split}.json holds no examples")
    by_uri = {s.image: s for s in data.samples(split)}
    classes = set(data.classes)
    image_id = model_config.image_token_index
    seq = model_config.image_seq_length
    out, samples = [], []
    for rec in records:
        try:
            human = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
            label = next(t["value"] for t in rec["conversations"] if t["from"] == "gpt")
        except (KeyError, StopIteration, TypeError):
            raise BadInput(f"{data.uri}: llava_{split}.json record {rec.get('id')!r} lacks a human or gpt "
                           f"turn") from None
        if label not in classes:
            raise BadInput(f"{data.uri}: llava_{split}.json record {rec.get('id')!r} has answer {label!r}, which is "
                           f"not in classes.json; re-run prep")
        if "<image>" not in human:
            raise BadInput(f"{data.uri}: llava_{split}.json record {rec.get('id')!r} has no <image> in its prompt")
        sample = by_uri.get(rec["image"])
        if sample is None:
            raise BadInput(f"{data.uri}: image {rec['image']} of record {rec.get('id')!r} is not in samples.parquet")
        example = training_example(tokenizer, human, label, image_id, conv, max_length)
        ids, labels = example.expanded(image_id, seq)
        cut = max(0, len(ids) - max_length)
        if cut:
            # as LLaVA's prepare_inputs_labels_for_multimodal: cut after the image is expanded; a cut into the
            # image tokens cannot be fed to the model (its features would outnumber them)
            if image_id in ids[max_length:]:
                raise BadInput(f"model_max_length={max_length} cuts into the image tokens of example "
                               f"{rec.get('id')!r} ({len(ids)} tokens with {seq} image tokens); raise "
                               f"--model-max-length")
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Example(ids, labels, "", example.mismatch, cut, len(human.split()) + len(label.split())))
        samples.append(sample)
    _warn_mismatches(out, records, data.uri, split)
    truncated = [(rec.get("id"), ex.truncated) for rec, ex in zip(records, out) if ex.truncated]
    if truncated:
        log.warning("%d of %d examples are longer than model_max_length=%d and were truncated, as LLaVA truncates "
                    "them (e.g. record %r lost %d tokens)", len(truncated), len(out), max_length, *truncated[0])
    # Fetched and verified in parallel (each image once): from an object store, one image after another is
    # minutes for a dataset.
    unique = list({s.image: s for s in samples}.values())
    with ThreadPoolExecutor(max_workers=16) as pool:
        paths = dict(zip((s.image for s in unique), pool.map(data.local_image, unique)))
    for ex, sample in zip(out, samples):
        ex.image_path = paths[sample.image]
    return out


def _warn_mismatches(examples: list[Example], records: list[dict], uri: str, split: str) -> None:
    bad = [(rec.get("id"), ex.mismatch) for rec, ex in zip(records, examples) if ex.mismatch]
    if not bad:
        return
    if len(bad) == len(examples):
        raise BadInput(f"{uri}: every llava_{split}.json example hits LLaVA's tokenization mismatch with this "
                       f"tokenizer (e.g. record {bad[0][0]!r}: {bad[0][1][0]} vs. {bad[0][1][1]} tokens), so none "
                       f"would be supervised; use a Llama-style tokenizer or conv=plain")
    log.warning("tokenization mismatch in %d of %d examples (e.g. record %r: %d vs. %d tokens): their labels are "
                "ignored, as LLaVA's preprocess_v1 does", len(bad), len(examples), bad[0][0], *bad[0][1])


@dataclass(frozen=True)
class Schedule:
    n_examples: int
    global_batch: int
    per_device_batch: int
    world: int
    epochs: float
    max_steps: int | None = None
    fill: str = "masked"                 # the epoch's last step: "masked" fillers, or "repeat" (they count)
    lengths: tuple | None = None         # group_by_length: each example's length (LLaVA's modality length)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.per_device_batch * self.world)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.global_batch)

    @property
    def total_steps(self) -> int:
        steps = max(1, math.ceil(self.steps_per_epoch * self.epochs))
        return min(steps, self.max_steps) if self.max_steps else steps

    def check(self) -> None:
        per_step = self.per_device_batch * self.world
        if self.global_batch % per_step:
            raise BadInput(f"global_batch={self.global_batch} is not a multiple of per_device_batch x GPUs = "
                           f"{self.per_device_batch} x {self.world}; pick a per_device_batch that divides "
                           f"{self.global_batch // self.world if self.global_batch % self.world == 0 else '?'}")

    def order(self, seed: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def step_samples(self, seed: int, step: int) -> list[tuple[int, bool]]:
        """The global batch of optimizer step `step` (0-based): (example index, counts toward the loss)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(seed, epoch)
        chunk = order[k * self.global_batch:(k + 1) * self.global_batch]
        real = [(i, True) for i in chunk]
        # "repeat": as accelerate's even_batches completes the last batches with samples from the start
        counts = self.fill == "repeat"
        filler = [(order[j % len(order)], counts) for j in range(self.global_batch - len(chunk))]
        return real + filler

    def rank_micro_batches(self, seed: int, step: int, rank: int) -> list[list[tuple[int, bool]]]:
        if self.lengths is not None:
            return self.grouped(self.step_samples(seed, step))[rank::self.world]
        samples = self.step_samples(seed, step)[rank::self.world]
        b = self.per_device_batch
        return [samples[i:i + b] for i in range(0, len(samples), b)]

    def grouped(self, samples: list) -> list[list]:
        """The step's micro-batches as LLaVA's LengthGroupedSampler makes them (`get_length_grouped_indices` with
        a megabatch of per-device batch x GPUs x accumulation = the global batch): longest first, dealt by
        `split_to_even_chunks` to the micro-batch with the fewest words so far; micro-batch k runs on rank
        k % world (the order accelerate shards batches in)."""
        n = self.world * self.accumulation
        ordered = sorted(samples, key=lambda s: self.lengths[s[0]], reverse=True)
        if len(ordered) % n:
            return [ordered[i::n] for i in range(n)]
        size = len(ordered) // n
        chunks: list[list] = [[] for _ in range(n)]
        weight = [0.0] * n
        for s in ordered:
            k = weight.index(min(weight))
            chunks[k].append(s)
            weight[k] += self.lengths[s[0]]
            if len(chunks[k]) == size:
                weight[k] = float("inf")
        return chunks


class MicroBatches:
    """Batch sampler over (example, counts) pairs for one rank, from `start_step` to the end."""

    def __init__(self, schedule: Schedule, seed: int, rank: int, start_step: int):
        self.schedule, self.seed, self.rank, self.start = schedule, seed, rank, start_step

    def __iter__(self):
        for step in range(self.start, self.schedule.total_steps):
            yield from self.schedule.rank_micro_batches(self.seed, step, self.rank)

    def __len__(self) -> int:
        return (self.schedule.total_steps - self.start) * self.schedule.accumulation


class TrainSet:
    """Map-style dataset indexed by (example index, counts) pairs: decodes and preprocesses the image."""

    def __init__(self, examples: list[Example], image_processor, aspect: str):
        self.examples, self.image_processor, self.aspect = examples, image_processor, aspect

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, counts = key
        ex = self.examples[index]
        pixels = pixel_values([open_rgb(ex.image_path)], self.image_processor, self.aspect)[0]
        labels = ex.labels if counts else [IGNORE_INDEX] * len(ex.labels)
        return {"input_ids": ex.input_ids, "labels": labels, "pixel_values": pixels}


def collate(pad_id: int):
    def fn(items: list[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            ids[i, :k] = torch.tensor(it["input_ids"])
            labels[i, :k] = torch.tensor(it["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([it["pixel_values"] for it in items])}
    return fn
