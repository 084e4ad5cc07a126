"""Fine-tuning on CPU with the tiny preset and a textures-mini prep output: what trains, that it learns, outputs,
kill + resume, and bad inputs."""

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import finetune, kill_after_checkpoint, weights  # noqa: E402

VISION = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_full_learns_and_keeps_the_vision_tower(tiny_model, prep, tmp_path):
    from mysproj.models.loading import load_llava

    out = str(tmp_path / "full")
    m = finetune(tiny_model, prep, out, strategy="full", lr=5e-3, epochs=2, warmup_ratio=0.0)
    s = m["summary"]
    assert (s["strategy"], s["global_batch"], s["per_device_batch"], s["accumulation"]) == ("full", 8, 4, 2)
    assert s["random_weights"] is True and s["precision"] == "fp32" and s["deepspeed"] is None
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    assert all(set(r) == {"step", "total", "loss", "lr", "samples_per_s", "eta_s"} for r in rows)
    # the time entry reuses the loop's own rate; the count is every step's global batch
    assert s["time"]["throughput"] == rows[-1]["samples_per_s"] and s["time"]["unit"] == "samples/s"
    assert s["processed"]["count"] == s["steps"] * 8
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.85 * first, (first, last)
    base, tuned = weights(tiny_model), weights(out)
    assert set(base) == set(tuned)
    for k in base:
        if k.startswith(VISION):
            assert torch.equal(base[k], tuned[k]), k
    assert not torch.equal(base["model.language_model.layers.0.mlp.up_proj.weight"],
                           tuned["model.language_model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(base[PROJECTOR + "linear_1.weight"], tuned[PROJECTOR + "linear_1.weight"])
    loaded = load_llava(out)  # an HF-layout model, loadable like any other
    assert loaded.random_weights is True and loaded.layout == "hf"
    assert os.path.isdir(os.path.join(out, "checkpoints", f"step-{s['steps']}"))


def test_projector_only_changes_the_projector(tiny_model, prep, tmp_path):
    from mysproj.models.loading import load_llava

    out = str(tmp_path / "proj")
    m = finetune(tiny_model, prep, out, strategy="projector", max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    assert m["summary"]["steps"] == 3 and m["summary"]["lr"] == 1e-3
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step-2", "step-3"]  # keep_checkpoints=2
    trained = weights(os.path.join(out, "checkpoints", "step-3"))
    assert sorted(trained) == sorted(PROJECTOR + n for n in
                                     ("linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"))
    proj = weights(out)
    orig = torch.load(os.path.join(out, "mm_projector.bin"), weights_only=True)
    assert torch.equal(orig["model.mm_projector.0.weight"], proj[PROJECTOR + "linear_1.weight"])
    assert torch.equal(orig["model.mm_projector.2.bias"], proj[PROJECTOR + "linear_2.bias"])
    base = weights(tiny_model)
    assert all(not torch.equal(base[k], proj[k]) for k in proj)
    with pytest.raises(Exception, match="projector-only"):
        load_llava(out)


def test_the_inputs_are_digested_once_per_run_not_once_per_checkpoint(tiny_model, prep, tmp_path, monkeypatch):
    from mysproj.storage import manifest

    calls = []
    real = manifest.input_digests
    monkeypatch.setattr(manifest, "input_digests", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = str(tmp_path / "proj")
    m = finetune(tiny_model, prep, out, strategy="projector", max_steps=3, checkpoint_every=1, keep_checkpoints=2)
    assert len(calls) == 1
    for step in (2, 3):
        ckpt = json.load(open(os.path.join(out, "checkpoints", f"step-{step}", "_SUCCESS.json")))
        assert ckpt["inputs"] == m["inputs"] and set(ckpt["inputs"]) == {"model", "data"}


def test_lora_writes_merged_model_and_adapter(tiny_model, prep, tmp_path):
    from peft import LoraConfig

    out = str(tmp_path / "lora")
    m = finetune(tiny_model, prep, out, strategy="lora", max_steps=2, gradient_checkpointing=False)
    assert m["summary"]["projector_lr"] == 2e-5 and m["summary"]["lr"] == 2e-4
    cfg = LoraConfig.from_pretrained(os.path.join(out, "adapter"))
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    adapter = weights(os.path.join(out, "adapter"))
    assert any(".lora_A." in k for k in adapter) and "model.multi_modal_projector.linear_1.weight" in adapter
    base, merged = weights(tiny_model), weights(out)
    assert set(base) == set(merged)
    for k in base:
        if k.startswith(VISION) or "embed_tokens" in k or "norm" in k:
            assert torch.equal(base[k], merged[k]), k
    # adapters are merged into the LLM's linear layers: W' = W + (alpha/r) B A
    q = "model.language_model.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if k.endswith(q + ".lora_A.weight"))
    b = next(v for k, v in adapter.items() if k.endswith(q + ".lora_B.weight"))
    torch.testing.assert_close(merged[q + ".weight"], base[q + ".weight"] + 2.0 * b @ a)
    assert not torch.equal(merged[q + ".weight"], base[q + ".weight"])


def test_killed_run_resumes_to_identical_weights(tiny_model, prep, tmp_path, monkeypatch):
    fields = dict(strategy="full", epochs=2, max_steps=5, checkpoint_every=2, lr=1e-3)
    straight = str(tmp_path / "straight")
    finetune(tiny_model, prep, straight, **fields)

    resumed = str(tmp_path / "resumed")
    with kill_after_checkpoint(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        finetune(tiny_model, prep, resumed, **fields)
    assert not os.path.exists(os.path.join(resumed, "_SUCCESS.json"))
    m = finetune(tiny_model, prep, resumed, **fields)
    assert m["summary"]["resumed_from"] == 2 and m["summary"]["steps"] == 5  # crosses into the second epoch
    a, b = weights(straight), weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(straight)]


def test_data_order_and_last_step_filling():
    from mysproj.training.data import Schedule

    s = Schedule(n_examples=10, global_batch=4, per_device_batch=1, world=2, epochs=2.0)
    assert (s.steps_per_epoch, s.total_steps, s.accumulation) == (3, 6, 2)
    epoch0 = [s.step_samples(7, k) for k in range(3)]
    real = [i for step in epoch0 for i, counts in step if counts]
    assert sorted(real) == list(range(10))  # every example once per epoch
    assert [c for _, c in epoch0[2]] == [True, True, False, False]
    assert s.step_samples(7, 1) == Schedule(10, 4, 1, 2, 2.0).step_samples(7, 1)  # pure function of seed/step
    assert s.order(7, 0) != s.order(7, 1)
    ranks = [s.rank_micro_batches(7, 1, r) for r in range(2)]
    assert sorted(x for r in ranks for mb in r for x in mb) == sorted(s.step_samples(7, 1))
    with pytest.raises(Exception, match="multiple"):
        Schedule(10, 6, 4, 1, 1.0).check()


def test_conversation_masks_all_but_the_answer(tiny_model):
    from transformers import AutoTokenizer

    from mysproj.models.conversation import IGNORE_INDEX, SYSTEM_VICUNA_V1, training_example

    tok = AutoTokenizer.from_pretrained(tiny_model)
    image = tok.convert_tokens_to_ids("<image>")
    ex = training_example(tok, "<image>\nWhich texture?", "star field", image)
    assert ex.text == f"{SYSTEM_VICUNA_V1} USER: <image>\nWhich texture? ASSISTANT: star field</s>"
    ids, labels = ex.expanded(image, 4)
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert answer == tok(" star field", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids.count(image) == 4 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False).replace("<image>" * 4, "<image>") == "<s>" + ex.text
    ex = training_example(tok, "<image>\nWhich texture?", "brick", image, conv="plain")
    ids, labels = ex.expanded(image, 4)
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert answer == tok("brick\n", add_special_tokens=False).input_ids
    assert ids[:5] == [tok.bos_token_id] + [image] * 4


def _copy_prep(prep, dest, mutate):
    shutil.copytree(prep, dest)
    records = json.load(open(os.path.join(dest, "llava_train.json")))
    mutate(records)
    data = json.dumps(records).encode()
    with open(os.path.join(dest, "llava_train.json"), "wb") as f:
        f.write(data)
    import hashlib

    man = json.load(open(os.path.join(dest, "_SUCCESS.json")))
    man["files"]["llava_train.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(man, open(os.path.join(dest, "_SUCCESS.json"), "w"))
    return str(dest)


@pytest.mark.parametrize("case", ["no-model", "prep-without-manifest", "unknown-class", "lr", "warmup", "batch"])
def test_bad_inputs_exit_64_with_one_line(case, tiny_model, prep, tmp_path, capsys):
    from mysproj.cli import main

    model, data, extra = tiny_model, prep, []
    if case == "no-model":
        model = str(tmp_path / "empty-model")
        os.makedirs(model)
        shutil.copy(os.path.join(tiny_model, "config.json"), model)
        want = "no model weights"
    elif case == "prep-without-manifest":
        data = str(tmp_path / "prep-copy")
        shutil.copytree(prep, data)
        os.remove(os.path.join(data, "_SUCCESS.json"))
        want = "not a complete stage output"
    elif case == "unknown-class":
        def relabel(records):
            records[3]["conversations"][1]["value"] = "velvet"
        data = _copy_prep(prep, tmp_path / "prep-bad", relabel)
        want = "'velvet', which is not in classes.json"
    elif case == "lr":
        extra, want = ["--lr", "5"], "'lr' = 5.0: must be <= 1.0"
    elif case == "warmup":
        extra, want = ["--warmup-ratio", "-0.1"], "'warmup_ratio'"
    else:
        extra, want = ["--global-batch", "6", "--per-device-batch", "4"], "not a multiple"
    rc = main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "out"), "--workers", "0",
               *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 64 and len(err) == 1 and want in err[0], err


def test_two_processes_train_like_one(tiny_model, prep, tmp_path):
    """torchrun with 2 CPU processes (gloo) and a different micro-batch split reaches the weights of a single
    process: the global batch, data order and the global-batch loss normalisation do not depend on the launch."""
    import subprocess
    import sys

    single = str(tmp_path / "single")
    finetune(tiny_model, prep, single, strategy="full", max_steps=3, lr=1e-3, per_device_batch=4,
             loss_normalization="global-batch")
    multi = str(tmp_path / "multi")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "mysproj.cli", "finetune", "--strategy", "full", "--model", tiny_model, "--data", prep, "--out", multi,
           "--global-batch", "8", "--per-device-batch", "2", "--max-steps", "3", "--lr", "1e-3", "--workers", "0",
           "--log-every", "1", "--checkpoint-every", "100", "--loss-normalization", "global-batch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(multi, "_SUCCESS.json")))["summary"]
    assert (summary["world_size"], summary["per_device_batch"], summary["accumulation"]) == (2, 2, 2)
    ckpt = os.listdir(os.path.join(multi, "checkpoints", "step-3"))
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(ckpt)
    a, b = weights(single), weights(multi)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in _metrics(single)] == pytest.approx([r["loss"] for r in _metrics(multi)], rel=1e-5)


def test_deepspeed_zero3_path_matches_and_resumes(tiny_model, prep, tmp_path, monkeypatch,
                                                  deepspeed_one_process):
    """The GPU code path (accelerate + DeepSpeed ZeRO-3: engine backward/step, sharded checkpoints with frozen
    weights excluded, the 16-bit gather at export) run on DeepSpeed's CPU accelerator, in fp32."""
    fields = dict(strategy="full", max_steps=3, checkpoint_every=2, lr=1e-3, precision="fp32")
    plain = str(tmp_path / "plain")
    finetune(tiny_model, prep, plain, **fields)
    ds = str(tmp_path / "zero3")
    with kill_after_checkpoint(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        finetune(tiny_model, prep, ds, deepspeed="zero3", **fields)
    assert os.path.isdir(os.path.join(ds, "checkpoints", "step-2", "ds"))
    m = finetune(tiny_model, prep, ds, deepspeed="zero3", **fields)
    assert m["summary"]["deepspeed"] == "zero3" and m["summary"]["resumed_from"] == 2
    a, b = weights(plain), weights(ds)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
        if k.startswith(VISION):
            assert torch.equal(a[k], b[k]), k
