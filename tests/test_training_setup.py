"""The fine-tuning set-up in its one order (`mysproj.training.setup`): what trains is fp32 and in the optimizer at
the learning rates resolved once from the one table of defaults; what is frozen keeps its dtype and stays out."""

import dataclasses

import pytest

from mysproj.config.stages import DEFAULT_GLOBAL_BATCH, DEFAULT_LR, DEFAULT_PROJECTOR_LR, FinetuneConfig


def _cfg(**kw):
    return FinetuneConfig(model="m", data="d", out="o", **kw)


def test_learning_rates_come_from_one_table_and_the_config_wins():
    from mysproj.training.setup import learning_rates

    for strategy, lr in DEFAULT_LR.items():
        assert learning_rates(_cfg(strategy=strategy)).lr == lr
    assert learning_rates(_cfg(strategy="lora")).projector_lr == DEFAULT_PROJECTOR_LR
    rates = learning_rates(_cfg(strategy="full", lr=0.5, projector_lr=0.25))
    assert (rates.lr, rates.projector_lr) == (0.5, 0.25)
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(FinetuneConfig)}
    assert helps["lr"].endswith("default 1e-3 projector, 2e-5 full, 2e-4 lora")  # the table, as the help prints it
    assert "2e-5" in helps["projector_lr"] and helps["global_batch"].endswith(
        ", ".join(f"{v} {s}" for s, v in DEFAULT_GLOBAL_BATCH.items()))


@pytest.mark.parametrize("strategy", ["projector", "full"])
def test_the_set_up_casts_what_trains_and_optimizes_only_that(strategy, tiny_model, monkeypatch):
    import torch

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # one plain process
        monkeypatch.delenv(var, raising=False)

    from mysproj.models.loading import load_llava
    from mysproj.training import session

    model = load_llava(tiny_model, dtype=torch.bfloat16).model
    cfg = dataclasses.replace(_cfg(strategy=strategy, precision="bf16"), model=tiny_model)
    ctx = session.build(cfg, model, world=1, micro=1, accumulation=1, total_steps=10)
    assert ctx.rates.lr == DEFAULT_LR[strategy]
    trained = {id(p) for p in ctx.trainable}
    in_optimizer = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    assert trained == in_optimizer and trained
    assert {g["initial_lr"] for g in ctx.optimizer.param_groups} == {DEFAULT_LR[strategy]}  # before warmup
    for name, p in ctx.unwrapped.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name   # step 3: fp32 master weights for what trains
        else:
            assert p.dtype == torch.bfloat16, name  # frozen weights keep their dtype
    llm = ctx.unwrapped.model.language_model
    assert llm.is_gradient_checkpointing == (strategy == "full")  # step 4: where memory needs it
