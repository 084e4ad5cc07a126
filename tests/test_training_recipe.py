"""Fine-tuning as the released scripts ran it: no gradient clipping (plain loop and the DeepSpeed config the trainer
builds) and the HF Trainer's loss (mean over micro-batches of each one's token-mean), with the global-batch token
mean as the option; exact values on a tiny model on the CPU."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
# The tests read the gradient where the optimizer would step; the scheduler notices the replaced step() and warns.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")


def _config(**fields):
    from mysproj.config.fields import load_config
    from mysproj.config.stages import FinetuneConfig

    base = dict(model="m", data="d", out="o", strategy="projector", precision="fp32", per_device_batch=2,
                global_batch=4, max_steps=1, shared_prefix=False)
    return load_config(FinetuneConfig, env={}, overrides={**base, **fields})


def _model():
    from mysproj.models.presets import build_random_llava

    model, _, _ = build_random_llava("tiny", seed=0, device="cpu")
    return model


def _batch(model, answers: list[int], seed: int, length: int = 16):
    """Two-row training batch: image tokens after the BOS, `answers[i]` supervised tokens at row i's end."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n = len(answers)
    ids = torch.randint(5, 500, (n, length), generator=g)
    ids[:, 0] = 1
    ids[:, 2:2 + cfg.image_seq_length] = cfg.image_token_id
    labels = torch.full_like(ids, -100)
    for i, a in enumerate(answers):
        labels[i, length - a:] = ids[i, length - a:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn((n, 3, size, size), generator=g)}


def _session(cfg, accumulation=2):
    from mysproj.training.session import build

    s = build(cfg, _model(), world=1, micro=2, accumulation=accumulation, total_steps=1)
    grads = []
    inner = s.optimizer.optimizer  # accelerate's wrapper steps the torch optimizer on the accumulation boundary
    inner.step = lambda *a, **k: grads.append(s.unwrapped.model.multi_modal_projector.linear_1.weight.grad.clone())
    return s, grads


def test_finetune_does_not_clip_by_default():
    cfg = _config()
    assert cfg.max_grad_norm == 0.0
    for max_grad_norm, calls_expected in ((None, 0), (1.0, 1)):
        s, _ = _session(_config(max_grad_norm=max_grad_norm))
        calls = []

        def clip(*a, _calls=calls, _clip=s.accelerator.clip_grad_norm_, **k):
            _calls.append(a)
            return _clip(*a, **k)

        s.accelerator.clip_grad_norm_ = clip
        model = s.unwrapped
        s.step([_batch(model, [3, 1], 0), _batch(model, [2, 2], 1)], targets=8)
        assert len(calls) == calls_expected


def test_the_deepspeed_config_the_trainer_builds_has_no_clipping(monkeypatch, one_process_env):
    import accelerate
    import accelerate.utils

    from mysproj.training import session

    built = []
    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", lambda hf_ds_config: built.append(hf_ds_config))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: type("A", (), {"num_processes": 1})())
    for name in ("zero2", "zero3", "zero3-offload"):
        session.accelerator(name, False, 2, 1, 2, 64, _config().max_grad_norm, False)
        # explicit: an absent key meant 0 in the DeepSpeed the scripts pinned, but means 1.0 from DeepSpeed 0.19.3 on
        assert built[-1]["gradient_clipping"] == 0.0, name
        assert built[-1]["zero_optimization"]["stage"] in (2, 3)
    session.accelerator("zero2", False, 2, 1, 2, 64, 1.0, False)
    assert built[-1]["gradient_clipping"] == 1.0


def _reference(batches, how: str):
    """Loss and projector gradient computed directly: each micro-batch's token-mean loss averaged over the
    micro-batches (HF Trainer), or the sum over every supervised token divided by their number."""
    import torch.nn.functional as F

    model = _model()
    model.requires_grad_(False)
    weight = model.model.multi_modal_projector.linear_1.weight
    weight.requires_grad_(True)
    sums, counts = [], []
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        sums.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                    reduction="sum"))
        counts.append(int((target != -100).sum()))
    if how == "micro-batch":
        loss = sum(s / n for s, n in zip(sums, counts)) / len(batches)
    else:
        loss = sum(sums) / sum(counts)
    loss.backward()
    return loss.item(), weight.grad


@pytest.mark.parametrize("how", ["micro-batch", "global-batch"])
def test_loss_normalisation_exact_values(how):
    cfg = _config(loss_normalization=how) if how != "micro-batch" else _config()
    assert cfg.loss_normalization == how
    s, grads = _session(cfg)
    model = s.unwrapped
    batches = [_batch(model, [5, 1], 0), _batch(model, [1, 1], 1)]  # 6 and 2 supervised tokens
    loss = s.step(batches, targets=8).item()
    want_loss, want_grad = _reference(batches, how)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], want_grad, rtol=1e-4, atol=1e-7)
    other, _ = _reference(batches, "global-batch" if how == "micro-batch" else "micro-batch")
    assert abs(other - want_loss) > 1e-3  # the two normalisations give different numbers here


def test_a_micro_batch_without_answers_adds_nothing():
    s, grads = _session(_config())
    model = s.unwrapped
    empty = _batch(model, [1, 1], 1)
    empty["labels"][:] = -100  # filler or mismatched examples only
    batches = [_batch(model, [3, 2], 0), empty]
    loss = s.step(batches, targets=5).item()
    want_loss, want_grad = _reference(batches[:1], "micro-batch")
    assert loss == pytest.approx(want_loss / 2, rel=1e-5)  # divided by every micro-batch, as the HF Trainer does
    torch.testing.assert_close(grads[0], want_grad / 2, rtol=1e-4, atol=1e-7)
