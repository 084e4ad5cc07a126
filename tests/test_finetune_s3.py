"""Fine-tune and merge with every input and output in S3 (SeaweedFS): checkpoints, resume and the model files."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import kill_after_checkpoint, stage, tensorboard_scalars  # noqa: E402

pytestmark = pytest.mark.s3


def _steps(uri):
    from mysproj.storage import list_files

    return {p.split("/")[0] for p in list_files(uri)}


def test_finetune_resume_and_merge_on_s3(s3_env, tmp_path, monkeypatch):
    from mysproj.storage import read_text

    root = f"{s3_env.create_bucket('ftruns')}/{tmp_path.name}"
    prep, base = f"{root}/textures-mini/prep", f"{root}/models/tiny"
    stage("prep", dataset="textures-mini", out=prep, max_per_class=2, workers=1)
    stage("model-init", preset="tiny", out=base)
    ft = f"{root}/textures-mini/ft-projector/seed0/finetune"
    fields = dict(model=base, data=prep, out=ft, strategy="projector", global_batch=2, max_steps=3,
                  checkpoint_every=1, keep_checkpoints=1, workers=0, log_every=1)
    with kill_after_checkpoint(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        stage("finetune", **fields)
    assert _steps(f"{ft}/checkpoints") == {"step-1", "step-2"}  # killed before pruning step-1
    m = stage("finetune", **fields)
    assert m["summary"]["resumed_from"] == 2
    assert _steps(f"{ft}/checkpoints") == {"step-3"}  # keep_checkpoints=1, pruned in the bucket
    assert [json.loads(x)["step"] for x in read_text(f"{ft}/metrics.jsonl").splitlines()] == [1, 2, 3]
    # TensorBoard's own S3 reader (boto3 with S3_ENDPOINT) sees each step once across the kill
    assert [s for s, _ in tensorboard_scalars(ft, s3=s3_env)["train/loss"]] == [1, 2, 3]
    merged = stage("merge", base=base, projector=ft, out=f"{root}/textures-mini/ft-projector/seed0/merge")
    assert merged["summary"]["random_weights"] is True and "model.safetensors" in merged["files"]
