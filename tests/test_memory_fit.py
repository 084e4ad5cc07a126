"""Where full fine-tuning keeps its state, decided from the card and the host memory (LLaVA-1.5-7B's real counts),
the one-line refusal instead of the OOM killer, and the host-memory reader on real-format cgroup/meminfo files."""

import pytest

from mysproj.errors import BadInput
from mysproj.training import memory_fit as mf

GIB = 2**30
TRAINABLE, TOTAL = 6_759_919_616, 7_063_427_072  # LLaVA-1.5-7B: LLM + lm_head + projector; + CLIP ViT-L/14-336
H100, H200 = int(79.2 * GIB), int(139.8 * GIB)   # torch's total_memory of an 80 GB and a 141 GB card


def _plan(gpu, host_gib, world=1, strategy="full", requested="auto", cuda=True):
    return mf.plan(trainable=TRAINABLE, total=TOTAL, gpu_bytes=gpu,
                   host=mf.HostMemory(int(host_gib * GIB), "the pod's memory limit"), world=world,
                   strategy=strategy, requested=requested, cuda=cuda)


def test_llava_7b_counts_from_its_config():
    text = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32}
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "patch_size": 14,
              "image_size": 336}
    # the same numbers as a LlavaForConditionalGeneration built from this config (counted on the meta device)
    assert mf.params_from_config({"text_config": text, "vision_config": vision}) == (TRAINABLE, TOTAL)
    # the original layout: LLaMA fields at the top, the tower elsewhere (CLIP ViT-L/14-336 assumed)
    assert mf.params_from_config({**text, "mm_hidden_size": 1024}) == (TRAINABLE, TOTAL)


def test_counts_come_from_a_model_folders_config_json_before_loading(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {
        "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32}, "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                                      "num_hidden_layers": 24, "patch_size": 14, "image_size": 336}}))
    assert mf.model_params(str(tmp_path)) == (TRAINABLE, TOTAL)
    assert mf.model_params(str(tmp_path / "absent")) is None  # the check after loading still runs


def test_one_h100_with_128_gib_offloads_the_optimizer_unpinned():
    p = _plan(H100, 128)
    assert (p.deepspeed, p.offload_param, p.pin_memory, p.sub_group_size) == ("zero3-offload", False, False,
                                                                             mf.SUB_GROUP)
    assert 30 * GIB < p.gpu_need < 40 * GIB            # bf16 params + gathered ones + activations
    assert 112 * GIB < p.host_need < 122 * GIB         # 18 B a trained parameter + the process
    mf.check(p)
    assert p.summary() == {"deepspeed": "zero3-offload", "offload_param": False, "pin_memory": False,
                           "sub_group_size": mf.SUB_GROUP, "host_source": "the pod's memory limit",
                           "gpu_need_gib": 35.0, "host_need_gib": 118.1, "gpu_gib": 79.2, "host_gib": 128.0}
    ds = mf.apply({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True},
                                         "offload_param": {"device": "cpu", "pin_memory": True}}}, p)
    assert ds["zero_optimization"] == {"offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "sub_group_size": mf.SUB_GROUP}


def test_pinning_only_where_it_fits_comfortably():
    assert _plan(H100, 256).pin_memory
    assert not _plan(H100, 150).pin_memory  # the pinned plan (power-of-two blocks) would take most of it


def test_one_h100_with_a_64_gib_pod_limit_is_refused_in_one_line():
    p = _plan(H100, 64)
    with pytest.raises(BadInput) as e:
        mf.check(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "119 GiB host memory, 64 GiB available (the pod's memory limit)" in msg
    assert "finetune.resources.limits.memory: 119Gi" in msg and "2 GPUs" in msg


def test_the_seeds_offload_of_parameters_and_optimizer_pinned_does_not_fit_128_gib():
    """What the OOM killer stopped: both offloads pinned need far more than 128 GiB; asked for by name, the
    parameters are offloaded too and the run is refused before DeepSpeed starts."""
    assert mf.host_need(TRAINABLE, TOTAL, True, True, mf.SHIPPED_SUB_GROUP) > 160 * GIB
    p = _plan(H100, 128, requested="zero3-offload")
    assert p.offload_param and not p.pin_memory
    with pytest.raises(BadInput, match="GiB host memory, 128 GiB available"):
        mf.check(p)


def test_no_offload_on_an_h200_nor_on_two_gpus_nor_for_the_projector():
    h200 = _plan(H200, 128)
    assert h200.deepspeed is None and h200.gpu_need <= H200
    mf.check(h200)
    assert _plan(H100, 64, world=2).deepspeed == "zero3"
    mf.check(_plan(H100, 64, world=2))
    for world, expected in ((1, None), (2, "zero2")):
        p = _plan(H100, 8, world=world, strategy="projector")
        assert p.deepspeed == expected and not p.offload_param and not p.host_need
        mf.check(p)


def test_no_deepspeed_asked_on_an_h100_is_refused_naming_the_gpu():
    with pytest.raises(BadInput, match="GiB GPU memory, the card has 79 GiB: use --deepspeed auto"):
        mf.check(_plan(H100, 512, requested="none"))


def test_cpu_runs_keep_the_config_asked_for():
    p = _plan(0, 8, requested="zero3-offload", cuda=False)
    assert p.deepspeed == "zero3-offload" and not p.gpu_need
    mf.check(p)


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MEMINFO = ("MemTotal:       131891000 kB\nMemFree:         2000000 kB\n"
           "MemAvailable:   125829120 kB\nBuffers:          100000 kB\n")


def test_host_memory_prefers_the_pods_cgroup_limit(tmp_path):
    _write(tmp_path, "proc/meminfo", MEMINFO)
    _write(tmp_path, "sys/fs/cgroup/memory.max", "68719476736\n")
    assert mf.host_memory(str(tmp_path)) == mf.HostMemory(64 * GIB, "the container's memory limit, cgroup "
                                                          "memory.max")


def test_host_memory_without_a_limit_is_memavailable(tmp_path):
    _write(tmp_path, "proc/meminfo", MEMINFO)
    _write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    assert mf.host_memory(str(tmp_path)) == mf.HostMemory(125829120 * 1024, "MemAvailable in /proc/meminfo")


def test_host_memory_reads_cgroup_v1_and_ignores_its_no_limit_value(tmp_path):
    _write(tmp_path, "proc/meminfo", MEMINFO)
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "34359738368\n")
    assert mf.host_memory(str(tmp_path)).bytes == 32 * GIB
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert mf.host_memory(str(tmp_path)).source == "MemAvailable in /proc/meminfo"


def test_a_limit_above_what_the_machine_has_free_is_not_what_counts(tmp_path):
    _write(tmp_path, "proc/meminfo", MEMINFO)
    _write(tmp_path, "sys/fs/cgroup/memory.max", str(512 * GIB))
    assert mf.host_memory(str(tmp_path)).bytes == 125829120 * 1024


def test_the_plan_reaches_the_deepspeed_config_accelerate_gets(monkeypatch, one_process_env):
    import accelerate
    import accelerate.utils

    from mysproj.training import session

    built = []
    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", lambda hf_ds_config: built.append(hf_ds_config))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: type("A", (), {"num_processes": 1})())
    session.accelerator("zero3-offload", True, 2, 1, 2, 64, 0.0, False, _plan(H100, 128))
    zero = built[-1]["zero_optimization"]
    assert "offload_param" not in zero and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["sub_group_size"] == mf.SUB_GROUP
    session.accelerator("zero3-offload", True, 2, 1, 2, 64, 0.0, False, _plan(0, 8, requested="zero3-offload",
                                                                             cuda=False))
    assert built[-1]["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}  # as shipped


def test_the_session_keeps_its_plan_and_drops_the_optimizer_state_before_the_export(tiny_model, one_process_env):
    """The plan reaches the session (the fine-tuning summary and its log line read it there), and the optimizer's
    state goes before the export gathers the model: on one 80 GB card with 128 GiB of host memory the export of a
    fully fine-tuned 7B does not fit beside Adam's moments (measured, docs/performance.md)."""
    import torch

    from mysproj.config.stages import FinetuneConfig
    from mysproj.models.loading import load_llava
    from mysproj.training import session

    cfg = FinetuneConfig(model=tiny_model, data="unused", out="unused", strategy="projector")
    ctx = session.build(cfg, load_llava(tiny_model).model, world=1, micro=1, accumulation=1, total_steps=1)
    assert isinstance(ctx.plan, mf.Plan) and ctx.grad_norm is None
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    ctx.optimizer.step()
    assert ctx.optimizer.state
    ctx.release_optimizer()
    assert not ctx.optimizer.state and not getattr(ctx.optimizer, "optimizer", ctx.optimizer).state
