"""Running stages and the CLI in-process from tests, and reading what they wrote. The shared inputs built with
these (tiny models, prep outputs) are fixtures in conftest.py."""

from __future__ import annotations

import contextlib


def stage(stage_name: str, **fields):
    """Run one stage in this process with `fields` over its config's defaults; returns the stage's summary."""
    from mysproj.config.fields import load_config
    from mysproj.stages.registry import STAGES, run

    return run(stage_name, load_config(STAGES[stage_name].config, overrides=fields))


def tiny_in_shards(out: str) -> dict:
    """model-init of the tiny LLaVA written in several shards of 200 kB, as a 7B model is written."""
    import pytest

    from mysproj.models import saving

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(saving, "SHARD_BYTES", 200_000)
        return stage("model-init", preset="tiny", out=out)


def error_lines(printed: str) -> list[str]:
    """The `error:` lines of what a command printed."""
    return [line for line in printed.splitlines() if line.startswith("error:")]


def cli(argv, capsys) -> tuple[int, list[str], str]:
    """The mysproj CLI run in this process on `argv` (any items, made strings): its exit code, the `error:` lines
    of its stderr, and all it printed (stdout, then stderr)."""
    from mysproj.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, error_lines(err), out + err


def llava_test_inputs(prep_uri: str, loaded, n: int, appended: dict[int, str]) -> tuple:
    """The first `n` test examples of a prep output as eval-llava builds them for `loaded` (a LoadedLlava), with
    `appended[i]` added to the question of example i: (the prepared data, the prompts' ids, the pixel values)."""
    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import llava_v1_prompt, pixel_values
    from mysproj.models.prompt_ids import prompt_ids
    from mysproj.stages.eval_llava import examples

    data = PreparedData(prep_uri)
    samples, humans = examples(data, "test", n)
    for i, text in appended.items():
        humans[i] += text
    cfg = loaded.model.config
    prompts = [prompt_ids(loaded.tokenizer, llava_v1_prompt(h), cfg.image_token_id, cfg.image_seq_length)
               for h in humans]
    return data, prompts, pixel_values([data.open_image(s) for s in samples], loaded.image_processor)


def weights(folder: str) -> dict:
    from mysproj.models.loading import read_weights

    return read_weights(folder, folder)


# What `finetune()` sets over the finetune config's defaults: small batches, a small LoRA, no loader workers.
FINETUNE_DEFAULTS = dict(global_batch=8, per_device_batch=4, workers=0, log_every=1, checkpoint_every=100, lora_r=4,
                         lora_alpha=8)


def finetune(tiny_model: str, prep: str, out: str, **fields) -> dict:
    return stage("finetune", model=tiny_model, data=prep, out=out, **{**FINETUNE_DEFAULTS, **fields})


@contextlib.contextmanager
def kill_after_checkpoint(monkeypatch, step: int, before_kill=None):
    """While active, a fine-tuning run raises KeyboardInterrupt (a kill) right after checkpoint `step` is saved;
    `before_kill(folder_of_step)` may first damage what was written. Saving is restored on exit."""
    from mysproj.training import checkpoint

    real_save = checkpoint.save

    def save_then_die(ctx, s, state, *rest):
        real_save(ctx, s, state, *rest)
        if s == step:
            if before_kill:
                before_kill(s)
            raise KeyboardInterrupt(f"simulated kill after checkpoint step {step}")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(checkpoint, "save", real_save)


def tensorboard_scalars(logdir: str, s3=None) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the event files directly in `logdir`, read by TensorBoard's own reader; for an
    s3:// URI, in a fresh process the way `S3_ENDPOINT=... tensorboard --logdir s3://...` reads it (TensorBoard
    binds its S3 client's endpoint when it is imported): boto3 pointed at `s3` (an S3Server) by S3_ENDPOINT only."""
    code = ("import json, sys\n"
            "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
            "acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n"
            "acc.Reload()\n"
            "print(json.dumps({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))\n")
    found = _tensorboard_reads(code, logdir, s3)
    return {tag: [tuple(p) for p in points] for tag, points in found.items()}


def tensorboard_runs(root: str, s3=None) -> dict[str, list[str]]:
    """{run: scalar tags} of what `tensorboard --logdir <root>` shows (its multiplexer walks the root), for an
    s3:// root read as `tensorboard_scalars` reads one."""
    code = ("import json, sys\n"
            "from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer\n"
            "mux = EventMultiplexer().AddRunsFromDirectory(sys.argv[1])\n"
            "mux.Reload()\n"
            "print(json.dumps({r: sorted(t['scalars']) for r, t in mux.Runs().items()}))\n")
    return _tensorboard_reads(code, root, s3)


def _tensorboard_reads(code: str, logdir: str, s3):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if s3 is not None:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MYSPROJ_S3_ENDPOINT"):
            env.pop(name, None)
        env["S3_ENDPOINT"] = s3.endpoint
    done = subprocess.run([sys.executable, "-c", code, logdir], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
