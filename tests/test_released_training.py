"""The released scripts' batching details, each an option: the micro-batch cap (pretrain.sh's 32 per device), the
epoch's last step filled with counted samples (accelerate's even_batches), LLaVA's length-grouped micro-batches
(group_by_modality_length) and truncation at model_max_length after the image is expanded."""

import logging

import pytest

from mysproj.training.data import Schedule


def test_micro_batch_cap_and_its_checkpointing():
    from types import SimpleNamespace

    from mysproj.training.loop import default_micro_batch
    from mysproj.training.setup import checkpointing

    assert default_micro_batch(64, 2, None) == 16
    assert default_micro_batch(64, 2, None, cap=32) == 32   # pretrain.sh: 32 per device on 2 GPUs
    assert default_micro_batch(64, 1, None, cap=32) == 32   # one GPU: 32 x 2 accumulation steps
    assert default_micro_batch(64, 2, 8, cap=32) == 8
    cfg = SimpleNamespace(gradient_checkpointing=None, strategy="projector", max_micro_batch=16)
    assert not checkpointing(cfg)
    cfg.max_micro_batch = 32
    assert checkpointing(cfg)  # pretrain.sh's --gradient_checkpointing True: 32 a device fits with it


def test_repeat_fill_counts_the_last_steps_fillers():
    masked = Schedule(n_examples=10, global_batch=4, per_device_batch=1, world=2, epochs=1.0)
    repeat = Schedule(n_examples=10, global_batch=4, per_device_batch=1, world=2, epochs=1.0, fill="repeat")
    last = repeat.step_samples(7, 2)
    assert [i for i, _ in last] == [i for i, _ in masked.step_samples(7, 2)]
    assert [c for _, c in last] == [True] * 4
    order = repeat.order(7, 0)
    assert [i for i, _ in last] == order[8:10] + order[:2]  # completed from the start of the epoch's order


def _llava_length_grouped(lengths, batch_size, world_size, perm):
    """LLaVA's llava_trainer.get_length_grouped_indices (with split_to_even_chunks) for a given permutation."""
    def split_to_even_chunks(indices, lengths, num_chunks):
        if len(indices) % num_chunks != 0:
            return [indices[i::num_chunks] for i in range(num_chunks)]
        num_indices_per_chunk = len(indices) // num_chunks
        chunks = [[] for _ in range(num_chunks)]
        chunks_lengths = [0 for _ in range(num_chunks)]
        for index in indices:
            shortest_chunk = chunks_lengths.index(min(chunks_lengths))
            chunks[shortest_chunk].append(index)
            chunks_lengths[shortest_chunk] += lengths[index]
            if len(chunks[shortest_chunk]) == num_indices_per_chunk:
                chunks_lengths[shortest_chunk] = float("inf")
        return chunks

    megabatch_size = world_size * batch_size
    megabatches = [perm[i: i + megabatch_size] for i in range(0, len(perm), megabatch_size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


@pytest.mark.parametrize("world, micro", [(1, 2), (2, 2), (2, 1)])
def test_length_grouping_is_llavas_sampler(world, micro):
    """The micro-batches each rank gets equal what LLaVA's LengthGroupedSampler (world_size = GPUs x accumulation,
    batch_size = per device) feeds, batched per device and sharded over ranks batch by batch as accelerate does."""
    import random

    rng = random.Random(0)
    lengths = tuple(rng.randint(20, 60) for _ in range(24))
    s = Schedule(n_examples=24, global_batch=8, per_device_batch=micro, world=world, epochs=1.0, lengths=lengths)
    s.check()
    for step in range(s.total_steps):
        perm = [i for i, _ in s.step_samples(3, step)]
        flat = _llava_length_grouped(list(lengths), micro, world * s.accumulation, perm)
        batches = [flat[i:i + micro] for i in range(0, len(flat), micro)]
        for rank in range(world):
            got = [[i for i, _ in mb] for mb in s.rank_micro_batches(3, step, rank)]
            assert got == batches[rank::world]
        assert sorted(i for r in range(world) for mb in s.rank_micro_batches(3, step, r) for i, _ in mb) == sorted(perm)


def test_over_long_examples_are_truncated_and_counted(prep_uri, caplog):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from test_prompt_ids import CharTokenizer

    from mysproj.data.prepared import PreparedData
    from mysproj.errors import BadInput
    from mysproj.training.data import load_examples

    data = PreparedData(prep_uri)
    config = SimpleNamespace(image_token_index=5, image_seq_length=4)
    full = load_examples(data, CharTokenizer(), config, conv="v1", max_length=100_000)
    longest = max(len(e.input_ids) for e in full)
    limit = longest - 3
    with caplog.at_level(logging.WARNING, logger="mysproj.finetune"):
        cut = load_examples(data, CharTokenizer(), config, conv="v1", max_length=limit)
    n_long = sum(len(e.input_ids) > limit for e in full)
    assert n_long >= 1 and sum(e.truncated > 0 for e in cut) == n_long
    for a, b in zip(full, cut):
        assert b.input_ids == a.input_ids[:limit] and b.labels == a.labels[:limit]
        assert b.words == a.words > 0
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"{n_long} of {len(cut)} examples" in warnings[0]
    with pytest.raises(BadInput, match="cuts into the image tokens"):
        load_examples(data, CharTokenizer(), config, conv="v1", max_length=3)


def test_finetune_runs_with_the_released_batching(tiny_model, prep, tmp_path):
    pytest.importorskip("torch")
    from stage_runs import finetune

    m = finetune(tiny_model, prep, str(tmp_path / "ft"), strategy="full", per_device_batch=None, max_micro_batch=2,
                 fill="repeat", group_by_length=True, max_steps=2)
    s = m["summary"]
    assert (s["per_device_batch"], s["accumulation"], s["fill"], s["group_by_length"]) == (2, 4, "repeat", True)
    assert s["truncated_examples"] == 0 and s["steps"] == 2
