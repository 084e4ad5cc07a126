"""The speed paths on CPU: the label-position loss, the memory-aware DeepSpeed choice, and the
FP8/compile switches wired through the finetune and eval-llava stages (the GPU speed itself is `mysproj bench`'s)."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import finetune, stage  # noqa: E402

GIB = 2**30


@pytest.fixture
def fp8_on_tiny_layers(monkeypatch):
    from mysproj.speed import llava as llava_speed

    monkeypatch.setattr(llava_speed, "FP8_MIN_FEATURES", 16)  # the tiny LLM's layers are 64-128 wide


def _llava(seed=0):
    from mysproj.models.presets import build_random_llava

    model, tok, _ = build_random_llava("tiny", seed=seed, device="cpu")
    return model, tok


def _batch(model, lengths, answer=3, seed=0):
    """Right-padded training batch: image tokens, text, `answer` supervised tokens at each row's end."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img, width = cfg.image_seq_length, max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(5, 500, (n,), generator=g)
        row[2:2 + n_img] = cfg.image_token_id
        ids[i, :n], mask[i, :n] = row, 1
        labels[i, n - answer:n] = row[n - answer:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn((len(lengths), 3, size, size), generator=g)}


def test_loss_at_label_positions_equals_full_logits_loss():
    import torch.nn.functional as F

    from mysproj.training.loss import answer_loss_sum, supervised_positions

    model, _ = _llava()
    batch = _batch(model, [20, 27, 23])  # different lengths: the rows' answers sit at different positions
    assert len(supervised_positions(batch["labels"])) == 9
    full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    expected = F.cross_entropy(full.reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    got = answer_loss_sum(model, batch, torch.float32, "cpu")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy,world,gpu_gib,expected", [
    ("full", 1, 139.8, None),            # H200: fp32 master weights + Adam fit, no offload
    ("full", 1, 79.2, "zero3-offload"),  # H100
    ("full", 2, 79.2, "zero3"),
    ("projector", 1, 79.2, None),
    ("projector", 2, 79.2, "zero2"),
    ("lora", 1, 79.2, None),
])
def test_auto_deepspeed_follows_card_memory(strategy, world, gpu_gib, expected):
    from mysproj.training.memory_fit import resolve_deepspeed

    assert resolve_deepspeed("auto", strategy, True, world, gpu_bytes=int(gpu_gib * GIB),
                             llm_params=6_738_415_616) == expected


@pytest.mark.parametrize("mode", ["all", "backward"])
def test_fp8_projector_training_follows_the_exact_gradient(fp8_on_tiny_layers, mode):
    """FP8 frozen LLM: the projector gradient keeps its direction (cosine > 0.99); the loss keeps its value
    within FP8's rounding, or exactly when only the input gradients run in FP8."""
    from mysproj.config.fields import load_config
    from mysproj.config.stages import FinetuneConfig
    from mysproj.models.fp8 import Float8Linear
    from mysproj.training.loss import answer_loss_sum
    from mysproj.training.session import build

    results = []
    for on in (False, True):
        model, _ = _llava()
        cfg = load_config(FinetuneConfig, env={}, overrides=dict(
            model="m", data="d", out="o", strategy="projector", fp8=on and mode == "all",
            fp8_backward=on and mode == "backward", precision="fp32", per_device_batch=3, global_batch=3,
            max_steps=1, gradient_checkpointing=False))
        s = build(cfg, model, world=1, micro=3, accumulation=1, total_steps=1)
        n_fp8 = sum(isinstance(m, Float8Linear) for m in s.unwrapped.modules())
        loss = answer_loss_sum(s.model, _batch(model, [20, 27, 23]), s.pixel_dtype, "cpu")
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in s.trainable])
        results.append((n_fp8, loss.item(), grad))
    (n0, loss0, g0), (n1, loss1, g1) = results
    assert n0 == 0 and n1 == 2 * 7  # q, k, v, o, gate, up, down in both decoder layers
    if mode == "backward":
        assert loss1 == loss0
    else:
        assert loss1 == pytest.approx(loss0, rel=0.02) and loss1 != loss0
    assert not torch.equal(g0, g1)  # FP8 did run in the backward
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.99


def test_eval_llava_fp8_scores_close_to_full_precision(tmp_path, prep_uri, llava_tiny_uri,
                                                       fp8_on_tiny_layers):
    import pyarrow.parquet as pq

    scores = {}
    for fp8 in (False, True):
        out = str(tmp_path / f"fp8-{fp8}")
        stage("eval-llava", model=llava_tiny_uri, data=prep_uri, out=out, mode="scoring", workers=0,
                      batch_size=4, limit=6, fp8=fp8)
        assert json.load(open(os.path.join(out, "metrics.json")))["fp8"] is fp8
        scores[fp8] = torch.tensor([r["scores"] for r in pq.read_table(os.path.join(out, "predictions.parquet"))
                                   .to_pylist()])
    assert not torch.equal(scores[False], scores[True])  # the FP8 path ran
    assert torch.allclose(scores[False], scores[True], rtol=0.02, atol=0.05)


def test_compiled_layers_give_the_eager_result():
    from mysproj.speed import llava as llava_speed

    model, _ = _llava()
    batch = _batch(model, [20, 24])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        eager = model(**inputs).logits
        done = llava_speed.apply(model, fp8=False, compile=True)
        compiled = model(**inputs).logits
    assert done["compiled_layers"] == 4  # 2 decoder + 2 vision encoder layers
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.language_model.layers)
    assert torch.allclose(eager, compiled, atol=1e-4)


def test_finetune_stage_records_what_ran(tmp_path, tiny_model, prep, fp8_on_tiny_layers):
    m = finetune(tiny_model, prep, str(tmp_path / "ft"), strategy="projector", fp8=True, max_steps=2)
    assert m["summary"]["final_loss"] > 0


def test_checkpoint_layers_limits_recomputation():
    from mysproj.config.fields import load_config
    from mysproj.config.stages import FinetuneConfig
    from mysproj.training.session import build

    model, _ = _llava()
    cfg = load_config(FinetuneConfig, env={}, overrides=dict(
        model="m", data="d", out="o", strategy="full", precision="fp32", per_device_batch=2, global_batch=2,
        max_steps=1, gradient_checkpointing=True, checkpoint_layers=1))
    s = build(cfg, model, world=1, micro=2, accumulation=1, total_steps=1)
    assert [layer.gradient_checkpointing for layer in s.unwrapped.model.language_model.layers] == [True, False]
    loss = s.step([_batch(model, [20, 24])], targets=6)
    assert loss.item() > 0


def test_fp8_is_skipped_with_a_warning_where_the_card_has_no_fp8(monkeypatch, caplog, fp8_on_tiny_layers):
    from mysproj.speed import llava as llava_speed

    model, _ = _llava()
    with monkeypatch.context() as m, caplog.at_level("WARNING"):
        m.setattr(llava_speed, "fp8_supported", lambda llava: False)  # e.g. an A100 (sm80)
        done = llava_speed.apply(model, fp8=True, compile=False)
    assert done["fp8_layers"] == 0 and "no FP8 tensor cores" in caplog.text
    assert llava_speed.apply(model, fp8=True, compile=False)["fp8_layers"] == 14
