"""The projector strategy's SharedPrefixForward (shared prefix once, last layer at the read rows only) against the
model's own forward, on CPU in fp32: the same loss and the same projector gradient, and the stage uses it."""

import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import finetune, weights  # noqa: E402


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _projector_llava():
    from mysproj.models.presets import build_random_llava
    from mysproj.training import strategies

    model, _, _ = build_random_llava("tiny", seed=0, device="cpu")
    return strategies.apply(model, "projector", None)


def _batch(model, lengths, prefix=5, answer=3, seed=0):
    """Right-padded rows sharing `prefix` tokens, then the image, then text of each row's length; the last
    `answer` tokens of each row supervised."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img, width = cfg.image_seq_length, max(lengths)
    shared = torch.randint(5, 500, (prefix,), generator=g)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(5, 500, (n,), generator=g)
        row[:prefix] = shared
        row[prefix:prefix + n_img] = cfg.image_token_id
        ids[i, :n], mask[i, :n] = row, 1
        labels[i, n - answer:n] = row[n - answer:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn((len(lengths), 3, size, size), generator=g)}


def _loss_and_grads(model, batch, shared):
    from mysproj.training.loss import answer_loss_sum

    model.zero_grad(set_to_none=True)
    loss = answer_loss_sum(model, batch, torch.float32, "cpu", shared)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_prefix_length_only_where_the_shortcut_is_exact():
    from mysproj.models.shared_prefix import prefix_length

    model = _projector_llava()
    image = model.config.image_token_id
    batch = _batch(model, [40, 47, 43], prefix=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert prefix_length(ids, mask, image) == 5
    other = ids.clone()
    other[1, 3] += 1                                     # rows differ before the image
    assert prefix_length(other, mask, image) == 0
    shifted = ids.clone()
    shifted[2] = torch.roll(ids[2], 1)                   # the image starts one position later in one row
    assert prefix_length(shifted, mask, image) == 0
    assert prefix_length(ids, torch.flip(mask, [1]), image) == 0   # left padding
    assert prefix_length(ids.masked_fill(ids == image, 7), mask, image) == 0  # no image


@pytest.mark.parametrize("lengths", [[40, 40], [40, 47, 43]])
def test_same_loss_and_projector_gradient_as_the_model_forward(lengths):
    from mysproj.models.shared_prefix import SharedPrefixForward

    model = _projector_llava()
    batch = _batch(model, lengths)
    assert len(model.model.language_model.layers) >= 2
    ref_loss, ref_grads = _loss_and_grads(model, batch, None)
    shared = SharedPrefixForward(model)
    calls = []
    real = shared._logits
    shared._logits = lambda *a: calls.append(a[3]) or real(*a)
    loss, grads = _loss_and_grads(model, batch, shared)
    assert calls == [5]                                  # the shortcut ran, with the 5-token prefix
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads) and all(n.startswith("model.multi_modal_projector.") for n in grads)
    for n in grads:
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)


def test_image_features_equal_the_models():
    from mysproj.models.shared_prefix import SharedPrefixForward

    model = _projector_llava()
    pixels = _batch(model, [40, 40])["pixel_values"]
    shared = SharedPrefixForward(model)
    assert shared.tower_layers == len(model.model.vision_tower.encoder.layers) - 1    # feature layer -2
    expected = torch.cat(list(model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output))
    torch.testing.assert_close(shared.image_features(pixels), expected)


def test_falls_back_to_the_model_forward_when_rows_differ_before_the_image():
    from mysproj.models.shared_prefix import SharedPrefixForward

    model = _projector_llava()
    batch = _batch(model, [40, 44])
    batch["input_ids"][1, 0] += 1
    shared = SharedPrefixForward(model)
    shared._logits = None                                # any use of the shortcut would fail
    ref_loss, _ = _loss_and_grads(model, batch, None)
    assert _loss_and_grads(model, batch, shared)[0] == ref_loss


def test_compiled_once_for_all_layers(compile_counter):
    """Every decoder layer passes through the same compiled graphs: one for the batch-1 prefix (no gradient), one
    for the rows after it, one for the last layer; more layers add none. The vision tower is not compiled whole."""
    from mysproj.models.shared_prefix import SharedPrefixForward

    model = _projector_llava()
    lm = model.model.language_model
    for _ in range(3):  # 5 layers: the per-layer function sees 4 different layer modules
        lm.layers.append(copy.deepcopy(lm.layers[0]))
    model.config.text_config.num_hidden_layers = len(lm.layers)
    shared = SharedPrefixForward(model, compile=True)
    batch = _batch(model, [40, 40])
    from mysproj.training.loss import answer_loss_sum

    ref = answer_loss_sum(model, batch, torch.float32, "cpu").item()
    for _ in range(2):  # the second batch reuses the prefix's keys and values and the compiled graphs
        assert answer_loss_sum(model, batch, torch.float32, "cpu", shared).item() == pytest.approx(ref, rel=1e-5)
    assert compile_counter.frame_count == 3 and len(shared._past) == 1


def test_compiled_once_whatever_the_batch_sizes_and_lengths(compile_counter):
    """Batches of other lengths, answer rows and sizes (a run's last batch) reuse the graphs: each function is
    compiled once, not once for the first sizes and again with symbolic ones."""
    from mysproj.models.shared_prefix import SharedPrefixForward
    from mysproj.training.loss import answer_loss_sum

    model = _projector_llava()
    shared = SharedPrefixForward(model, compile=True)
    for lengths, answer in (([40, 40], 3), ([44, 38], 2), ([36, 41, 39], 4), ([43, 43], 2)):
        batch = _batch(model, lengths, answer=answer)
        ref = answer_loss_sum(model, batch, torch.float32, "cpu").item()
        assert answer_loss_sum(model, batch, torch.float32, "cpu", shared).item() == pytest.approx(ref, rel=1e-5)
    assert compile_counter.frame_count == 3  # prefix (no gradient), rows, last layer


@pytest.mark.parametrize("deepspeed", ["none", "zero2"])
def test_projector_stage_uses_it_and_trains_the_same_weights(tiny_model, prep, tmp_path, monkeypatch,
                                                             request, deepspeed):
    """The stage takes the shortcut and reaches the same weights. zero2: two GPUs train the projector under ZeRO-2
    by default, whose gradient hooks sit on the parameters, so the shortcut (which calls the modules, not the
    engine) must work there too (DeepSpeed's CPU accelerator)."""
    from mysproj.models.shared_prefix import SharedPrefixForward

    if deepspeed != "none":
        request.getfixturevalue("deepspeed_one_process")
    calls, real = [], SharedPrefixForward._logits
    monkeypatch.setattr(SharedPrefixForward, "_logits", lambda self, *a: calls.append(a[3]) or real(self, *a))
    fields = dict(strategy="projector", max_steps=2, lr=1e-3, precision="fp32")
    plain, fast = str(tmp_path / "plain"), str(tmp_path / "fast")
    finetune(tiny_model, prep, plain, shared_prefix=False, **fields)
    assert calls == []
    summary = finetune(tiny_model, prep, fast, deepspeed=deepspeed, **fields)["summary"]
    assert summary["shared_prefix"] is True
    assert len(calls) == 4 and all(p > 0 for p in calls)          # 2 steps x 2 micro-batches
    assert [r["loss"] for r in _metrics(fast)] == pytest.approx([r["loss"] for r in _metrics(plain)], rel=1e-5)
    a, b = weights(plain), weights(fast)
    assert any(k.startswith("model.multi_modal_projector.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
