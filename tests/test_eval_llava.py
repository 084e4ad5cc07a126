import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")

from stage_runs import llava_test_inputs, stage  # noqa: E402

LIMIT = 6


@pytest.mark.parametrize("mode", ["generate", "scoring"])
def test_eval_llava_end_to_end(tmp_path, prep_uri, llava_tiny_uri, mode):
    out = str(tmp_path / mode)
    m = stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=out, mode=mode, workers=0,
                      batch_size=4, limit=LIMIT, max_new_tokens=8)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    rows = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()
    assert metrics["n"] == len(rows) == LIMIT
    assert metrics["mode"] == mode and metrics["random_weights"] is True
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / LIMIT)
    classes = metrics["labels"]
    if mode == "generate":
        assert all(isinstance(r["answer"], str) for r in rows)
        assert metrics["unparsed"] == sum(r["prediction"] is None for r in rows)
        assert all(r["how"] in ("exact", "contained", "close", "unparsed") for r in rows)
    else:
        assert metrics["unparsed"] == 0
        for r in rows:
            assert len(r["scores"]) == len(classes)
            assert r["prediction"] == classes[max(range(len(classes)), key=r["scores"].__getitem__)]
    assert m["summary"]["images_per_s"] > 0
    assert m["summary"]["time"]["throughput"] == m["summary"]["images_per_s"]  # the loop's rate, not timed twice
    assert m["summary"]["time"]["unit"] == "images/s" and m["summary"]["processed"]["count"] == LIMIT
    assert m["summary"]["shared_prefix"] == (mode == "scoring")


@pytest.fixture
def loaded(llava_tiny_uri):
    from mysproj.models.loading import load_llava

    return load_llava(llava_tiny_uri)


def _inputs(prep_uri, loaded, n=LIMIT):
    from mysproj.evaluation import scoring

    # prompts of different lengths, so left padding is exercised
    data, prompts, pix = llava_test_inputs(prep_uri, loaded, n, {1: " Answer in one word."})
    return data, prompts, pix, [scoring.continuation_ids(loaded.tokenizer, c) for c in data.classes]


def test_scoring_equals_full_sequence_loglikelihood(prep_uri, loaded):
    """The batched prefix-cache scoring equals scoring each full sequence alone, without padding."""
    from mysproj.evaluation import scoring

    data, prompts, pix, conts = _inputs(prep_uri, loaded)
    assert len({len(p) for p in prompts}) > 1
    model, tok = loaded.model, loaded.tokenizer
    batch = scoring.left_pad(prompts, tok.pad_token_id, "cpu")
    fast, _ = scoring.score_continuations(model, batch, pix, conts)
    slow = torch.zeros_like(fast)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for k, c in enumerate(conts):
                ids = torch.tensor([p + c])
                logp = torch.log_softmax(model(input_ids=ids, pixel_values=pix[i:i + 1]).logits[0].float(), -1)
                slow[i, k] = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=1e-4)
    assert fast.argmax(-1).tolist() == slow.argmax(-1).tolist()


@pytest.mark.parametrize("padded", [False, True])
def test_scoring_with_the_shared_prefix_equals_without(prep_uri, loaded, padded):
    """The system prompt's keys and values kept, the last layer at the read rows only: the same scores. Only an
    unpadded batch (every image with the same prompt, as a dataset's are) takes that path."""
    from mysproj.evaluation import scoring
    from mysproj.models.shared_prefix import SharedPrefixForward

    data, prompts, pix, conts = _inputs(prep_uri, loaded)
    if not padded:
        prompts = [prompts[0]] * len(prompts)
    model = loaded.model
    batch = scoring.left_pad(prompts, loaded.tokenizer.pad_token_id, "cpu")
    ref, ref_first = scoring.score_continuations(model, batch, pix, conts)
    fast = SharedPrefixForward(model)
    calls, real = [], fast._logits
    fast._logits = lambda *a: calls.append(a[3]) or real(*a)
    for _ in range(2):  # the second batch reuses the system prompt's keys and values
        got, first = scoring.score_continuations(model, batch, pix, conts, fast)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(first, ref_first, atol=1e-4, rtol=1e-5)
    assert calls == ([] if padded else [prompts[0].index(model.config.image_token_id)] * 2)
    assert len(fast._past) == (0 if padded else 1)


def test_scoring_does_not_depend_on_batching(prep_uri, loaded):
    from mysproj.evaluation import scoring

    data, prompts, pix, conts = _inputs(prep_uri, loaded)
    pad = loaded.tokenizer.pad_token_id
    together, _ = scoring.score_continuations(loaded.model, scoring.left_pad(prompts, pad, "cpu"), pix, conts)
    alone = torch.cat([scoring.score_continuations(loaded.model, scoring.left_pad([p], pad, "cpu"), pix[i:i + 1],
                                                   conts)[0] for i, p in enumerate(prompts)])
    torch.testing.assert_close(together, alone, atol=1e-3, rtol=1e-4)


def test_generate_and_scoring_share_the_prefix(prep_uri, loaded):
    """Greedy generation's first token is the argmax of the prefix logits scoring uses, and batched
    (left-padded) generation gives the same answers as one example at a time."""
    from transformers import GenerationConfig

    from mysproj.evaluation import scoring
    from mysproj.stages.eval_llava import generate

    data, prompts, pix, conts = _inputs(prep_uri, loaded)
    model, tok = loaded.model, loaded.tokenizer
    batch = scoring.left_pad(prompts, tok.pad_token_id, "cpu")
    _, first_logits = scoring.score_continuations(model, batch, pix, conts)
    cfg = GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pix,
                             generation_config=cfg)
    assert out[:, -1].tolist() == first_logits.argmax(-1).tolist()
    batched = generate(model, batch, pix, 6, tok.pad_token_id, tok)
    single = [generate(model, scoring.left_pad([p], tok.pad_token_id, "cpu"), pix[i:i + 1], 6, tok.pad_token_id,
                       tok)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_continuations_match_training_targets(loaded):
    """Scoring ranks exactly the answer tokens that fine-tuning supervises."""
    from mysproj.evaluation import scoring
    from mysproj.models.conversation import training_example

    tok, cfg = loaded.tokenizer, loaded.model.config
    ex = training_example(tok, "<image>\nWhich texture?", "star field", cfg.image_token_id)
    assert [t for t in ex.labels if t != -100] == scoring.continuation_ids(tok, "star field")


def test_a_prompt_and_answer_beyond_the_models_context_is_refused_before_any_image(tmp_path, prep_uri,
                                                                                  llava_tiny_uri, capsys):
    from stage_runs import cli

    out = tmp_path / "eval"
    rc, errors, _ = cli(["eval-llava", "--model", llava_tiny_uri, "--data", prep_uri, "--out", out,
                         "--max-new-tokens", 2048, "--workers", 0], capsys)
    assert rc == 64 and len(errors) == 1
    assert "over the model's context of 2048" in errors[0] and "--max-new-tokens" in errors[0]
    assert not (out / "_SUCCESS.json").exists()
