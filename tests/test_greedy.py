"""The generate mode's own greedy loop (`mysproj.evaluation.greedy`) against transformers' `generate`, on CPU in
fp32: the same tokens, with rows that stop at `</s>` at different steps, prompts of different lengths, the
system prompt's keys and values shared, and finished rows moved to smaller workspaces."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")

from stage_runs import llava_test_inputs, stage  # noqa: E402

N = 6
NEW_TOKENS = 16


def _reference(loaded, prompts, pix, new_tokens=NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy tokens of each row, up to (without) `</s>`."""
    from transformers import GenerationConfig

    from mysproj.evaluation.scoring import left_pad

    tok = loaded.tokenizer
    batch = left_pad(prompts, tok.pad_token_id, "cpu")
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    pixel_values=pix, generation_config=cfg)
    rows = out[:, batch.input_ids.shape[1]:].tolist()
    return [row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in rows]


@pytest.fixture(scope="module")
def stopping(prep_uri, llava_tiny_uri):
    """The tiny model with `</s>` made the greedy choice wherever one of its usual tokens was (lm_head's `</s>`
    row = 1.5 x that token's row), picked so that some rows stop early and others use the whole budget. Built once
    for the module (a model load and many `generate` calls): the decoders only read the model."""
    from mysproj.models.loading import load_llava

    loaded = load_llava(llava_tiny_uri)
    loaded.model.requires_grad_(False)
    # prompts of different lengths
    _, prompts, pix = llava_test_inputs(prep_uri, loaded, N, {1: " Answer in one word.", 3: " Be brief, please."})
    plain = _reference(loaded, prompts, pix)
    head = loaded.model.lm_head.weight
    original = head[loaded.tokenizer.eos_token_id].clone()
    for token in sorted({t for row in plain for t in row[1:]}):
        head.data[loaded.tokenizer.eos_token_id] = 1.5 * head[token]
        ref = _reference(loaded, prompts, pix)
        lengths = sorted(len(r) for r in ref)
        if lengths[0] < NEW_TOKENS // 2 and lengths[N // 2] < NEW_TOKENS and lengths[-1] == NEW_TOKENS:
            return loaded, prompts, pix, ref
        head.data[loaded.tokenizer.eos_token_id] = original
    pytest.fail("no token makes some rows stop early and others run to the budget")


def _decoder(loaded, max_rows=N):
    from mysproj.evaluation.greedy import GreedyDecoder

    tok = loaded.tokenizer
    return GreedyDecoder(loaded.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_rows=max_rows)


def test_same_tokens_as_transformers_generate(stopping):
    loaded, prompts, pix, ref = stopping
    assert len({len(p) for p in prompts}) > 1
    decoder = _decoder(loaded)
    assert decoder(prompts, pix, NEW_TOKENS) == ref
    # the rows still running moved to a smaller workspace (of 6 // 2**k rows), and decoding ended with the longest
    assert decoder.stats["moves"] >= 1 and min(decoder.spaces) < N
    assert decoder.stats["steps"] == NEW_TOKENS - 1
    assert len(decoder.fast._past) == 1  # the system prompt's keys and values, kept


def test_workspaces_are_reused_and_grow_with_the_prompts(stopping):
    """One decoder over several batches (the stage's loop): smaller batches, a longer prompt (more cache slots,
    so the workspaces are rebuilt) and a budget of one token all give transformers' tokens."""
    loaded, prompts, pix, ref = stopping
    decoder = _decoder(loaded)
    assert decoder(prompts[:4], pix[:4], NEW_TOKENS) == ref[:4]
    slots = decoder.slots
    image_token = loaded.model.config.image_token_id
    text = prompts[4][len(prompts[4]) - prompts[4][::-1].index(image_token):]  # the tokens after the image
    longer = [prompts[4] + text * (1 + 80 // len(text)), prompts[5]]
    assert decoder(longer, pix[4:], NEW_TOKENS) == _reference(loaded, longer, pix[4:])
    assert decoder.slots > slots
    assert decoder(prompts, pix, 1) == [r[:1] for r in ref]
    assert decoder(prompts[2:3], pix[2:3], NEW_TOKENS) == ref[2:3]


def test_falls_back_where_plain_greedy_does_not_apply(llava_tiny_uri):
    from mysproj.evaluation.greedy import unsupported
    from mysproj.models.loading import load_llava

    model = load_llava(llava_tiny_uri).model
    assert "frozen Llama" in unsupported(model)  # loaded models train until frozen
    model.requires_grad_(False)
    assert unsupported(model) is None
    model.generation_config.repetition_penalty = 1.2
    assert "repetition_penalty" in unsupported(model)


def test_stage_predictions_equal_with_and_without_static_decode(tmp_path, prep_uri, llava_tiny_uri):
    rows, summaries = {}, {}
    for static in (False, True):
        out = str(tmp_path / str(static))
        m = stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=out, mode="generate", workers=0,
                          batch_size=4, limit=7, max_new_tokens=12, static_decode=static)
        rows[static] = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
        summaries[static] = m["summary"]
        assert json.load(open(os.path.join(out, "metrics.json")))["n"] == 7
    assert rows[True] == rows[False]
    assert "static_decode" not in summaries[False]
    assert summaries[True]["static_decode"]["prefills"] == 2 and summaries[True]["cuda_graphs"] is False


def test_cuda_graph_orchestration_gives_the_same_tokens(stopping, monkeypatch):
    """The CUDA graph path on CPU with stand-ins that behave as capture does: recording a step executes nothing
    and a replay runs what was recorded. One graph per workspace size, each captured after an eager warm-up step,
    then replayed: the tokens stay transformers'."""
    import contextlib
    import types

    from mysproj.evaluation import greedy

    real_step, capturing = greedy.decode_step, []

    class Graph:
        def replay(self):
            real_step(*self.recorded)

    def step(llava, ws):
        if capturing:
            capturing[-1].recorded = (llava, ws)  # recorded, not run
        else:
            real_step(llava, ws)

    @contextlib.contextmanager
    def graph(g, capture_error_mode):
        assert capture_error_mode == "thread_local"
        capturing.append(g)
        yield
        capturing.pop()

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(greedy, "decode_step", step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    loaded, prompts, pix, ref = stopping
    decoder = _decoder(loaded)
    decoder.cuda_graphs = True
    assert decoder(prompts, pix, NEW_TOKENS) == ref
    assert decoder(prompts, pix, NEW_TOKENS) == ref  # the second batch only replays
    assert decoder.stats["graphs"] == len(decoder.spaces) >= 2
    assert all(ws.graph is not None for ws in decoder.spaces.values())
