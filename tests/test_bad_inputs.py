"""Bad input a new user meets, through the CLI: one `error:` line naming the file and what to do, exit code 64, no
traceback, no secret anywhere in what is printed. Model folders without a manifest, symbolic links out of a dataset,
decompression bombs, unusable URIs and outputs, and misspelt environment variables."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from dataset_layouts import make_dtd, make_imagefolder, write, write_image
from stage_runs import cli, finetune

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _unmanifested_copy(model: str, dest) -> str:
    shutil.copytree(model, dest)
    os.remove(os.path.join(dest, "_SUCCESS.json"))
    return str(dest)


def _truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def bomb_png(path: str, side: int = 20000) -> str:
    """A PNG whose header declares side x side RGB pixels, with only a token of compressed data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")
    return write(path, data)


# ------------------------------------------------------------------------ models without a manifest (item 2)

def test_outside_model_folder_is_checked_and_used(tiny_model, prep, tmp_path, capsys):
    model = _unmanifested_copy(tiny_model, tmp_path / "llava-hf")
    rc, errors, printed = cli(["eval-llava", "--model", model, "--data", prep, "--out", tmp_path / "ev", "--mode",
                               "scoring", "--workers", "0", "--limit", "2"], capsys)
    assert rc == 0 and errors == []
    assert f"{model} has no _SUCCESS.json: used as a model from outside mysproj (1 weights file(s) checked: " \
           f"complete)" in printed


def test_truncated_model_file_is_one_line_and_exit_64(tiny_model, prep, tmp_path, capsys):
    """A model-init output killed half-way (no manifest, a short weights file): refused before loading, not a
    35-line traceback and exit 1 (which Kubernetes would retry)."""
    model = _unmanifested_copy(tiny_model, tmp_path / "half")
    _truncate(os.path.join(model, "model.safetensors"))
    size = os.path.getsize(os.path.join(model, "model.safetensors"))
    rc, errors, printed = cli(["eval-llava", "--model", model, "--data", prep, "--out", tmp_path / "ev",
                               "--workers", "0"], capsys)
    assert rc == 64 and "Traceback" not in printed
    assert errors == [f"error: {model}/model.safetensors: truncated ({size} bytes; its header describes "
                      f"{size * 2}); download or copy it again"]


def test_index_naming_a_missing_shard_is_refused(tiny_model, tmp_path, capsys):
    import json

    model = _unmanifested_copy(tiny_model, tmp_path / "sharded")
    os.rename(os.path.join(model, "model.safetensors"), os.path.join(model, "model-00001-of-00002.safetensors"))
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                  "b": "model-00002-of-00002.safetensors"}}, f)
    image = write_image(str(tmp_path / "x.jpg"), 1)
    rc, errors, _ = cli(["ask", "--model", model, "--image", image, "--prompt", "hi"], capsys)
    assert rc == 64 and errors == [f"error: {model}: model.safetensors.index.json names shard(s) that are missing: "
                                   f"model-00002-of-00002.safetensors; the folder is incomplete"]


def test_merge_refuses_the_projector_of_an_unfinished_finetune(tiny_model, prep, tmp_path, capsys):
    ft = str(tmp_path / "ft")
    finetune(tiny_model, prep, ft, strategy="projector", max_steps=1)
    os.remove(os.path.join(ft, "_SUCCESS.json"))  # killed between writing its files and its manifest
    rc, errors, _ = cli(["merge", "--base", tiny_model, "--projector", f"{ft}/projector.safetensors", "--out",
                         tmp_path / "merged"], capsys)
    assert rc == 64 and errors == [f"error: {ft}/projector.safetensors: inside an unfinished fine-tune output ({ft} "
                                   f"has no _SUCCESS.json); let the fine-tune finish (re-running it resumes it) "
                                   f"and pass {ft}"]


# ----------------------------------------------------------------------------- symbolic links (item 3)

def test_symlink_to_a_file_outside_the_dataset_is_refused(tmp_path, capsys):
    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    os.symlink("/etc/hostname", os.path.join(src, "train", "a", "leak.jpg"))
    rc, errors, printed = cli(["prep", "--dataset", "imagefolder", "--source", src, "--out", tmp_path / "out",
                               "--workers", "1"], capsys)
    assert rc == 64 and errors == [f"error: {src}/train/a/leak.jpg: a symbolic link to /etc/hostname, outside the "
                                   f"dataset root {src}; datasets must hold their own files (copy the file in, or "
                                   f"remove the link)"]
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_symlink_to_an_image_outside_a_dtd_root_is_refused_and_links_inside_are_kept(tmp_path, capsys):
    dtd = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy"), per_split=2)
    outside = write_image(str(tmp_path / "elsewhere" / "photo.jpg"), 5)
    inside = os.path.join(dtd, "images", "banded", "banded_0001.jpg")
    os.remove(inside)
    os.symlink(os.path.join(dtd, "images", "blotchy", "blotchy_0007.jpg"), inside)  # within the root: fine
    out = tmp_path / "out"
    assert cli(["prep", "--dataset", "dtd", "--source", dtd, "--out", out, "--workers", "1"], capsys)[0] == 0
    link = os.path.join(dtd, "images", "banded", "banded_0002.jpg")
    os.remove(link)
    os.symlink(outside, link)
    rc, errors, _ = cli(["prep", "--dataset", "dtd", "--source", dtd, "--out", out, "--workers", "1"], capsys)
    assert rc == 64 and errors == [f"error: {link}: a symbolic link to {outside}, outside the dataset root {dtd}; "
                                   f"datasets must hold their own files (copy the file in, or remove the link)"]


# --------------------------------------------------------------------------- decompression bombs (item 4)

def test_bomb_is_skipped_from_its_header_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from mysproj.stages import prep as prep_stage

    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    bomb = bomb_png(os.path.join(src, "train", "a", "bomb.png"))
    real_load = ImageFile.ImageFile.load

    def load(self):
        assert self.size != (20000, 20000), "the bomb was decoded"
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    from prep_helpers import read_outputs, run_prep

    run_prep(str(tmp_path / "out"), dataset="imagefolder", source=src)
    report = read_outputs(str(tmp_path / "out"))["report"]
    assert [(s["image"], s["reason"]) for s in report["skipped"]] == [
        (bomb, "too large (20000x20000 = 400 MP declared in its header, above the limit of 100 MP, max_image_pixels); "
               "not decoded")]
    assert report["skipped_by_reason"] == {"too large": 1}
    assert prep_stage  # the stage module ran in this process (workers=1): the monkeypatch applied


def test_bomb_limit_is_a_prep_field(tmp_path):
    from prep_helpers import read_outputs, run_prep

    src = make_imagefolder(str(tmp_path / "src"), {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    big = write_image(os.path.join(src, "test", "b", "big.png"), 9, size=(40, 40))
    run_prep(str(tmp_path / "out"), dataset="imagefolder", source=src, max_image_pixels=1000)
    skipped = read_outputs(str(tmp_path / "out"))["report"]["skipped"]
    assert [s["image"] for s in skipped] == [big]


def test_ask_refuses_a_bomb_a_folder_and_a_text_file_named_jpg(tiny_model, tmp_path, capsys):
    bomb = bomb_png(str(tmp_path / "bomb.png"))
    text = write(str(tmp_path / "notes.jpg"), b"not an image at all\n")
    cases = {bomb: f"error: {bomb}: too large (20000x20000 = 400 MP declared in its header, above the limit of 100 "
                   f"MP, max_image_pixels); not decoded",
             str(tmp_path): f"error: {tmp_path}: is a folder, not a file",
             text: f"error: {text}: not an image (unknown format)"}
    for image, line in cases.items():
        rc, errors, printed = cli(["ask", "--model", tiny_model, "--image", image, "--prompt", "hi"], capsys)
        assert (rc, errors) == (64, [line]) and "Traceback" not in printed


# ------------------------------------------------------------------------- URIs and outputs (item 5)

def test_unwritable_out_and_unknown_scheme(tmp_path, capsys):
    base = ["prep", "--dataset", "textures-mini", "--max-per-class", "1", "--workers", "1"]
    assert cli([*base, "--out", "/dev/null/x"], capsys)[:2] == (
       64, ["error: /dev/null/x: cannot write here (Not a directory); pass a writable --out"])
    assert cli([*base, "--out", "foo://bucket/x"], capsys)[:2] == (
       64, ["error: foo://bucket/x: unknown URI scheme 'foo://'; use a path, file://, s3:// or another installed "
            "fsspec scheme"])
    assert cli(["prep", "--dataset", "dtd", "--source", "foo://bucket/dtd", "--out", tmp_path / "o"], capsys)[:2] \
        == (64, ["error: foo://bucket/dtd: unknown URI scheme 'foo://'; use a path, file://, s3:// or another "
                 "installed fsspec scheme"])


REFUSED = ("credentials inside a URI are refused; give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the "
           "chart's credentials Secret)")


def test_credentials_in_a_uri_are_refused_and_never_printed(tiny_model, tmp_path, capsys):
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/dtd"
    rc, errors, printed = cli(["prep", "--dataset", "dtd", "--source", uri, "--out", tmp_path / "o"], capsys)
    assert (rc, errors) == (64, [f"error: config field 'source' = 's3://***@bucket/dtd': {REFUSED}"])
    rc, errors, printed2 = cli(["ask", "--model", tiny_model, "--image", f"{uri}/x.jpg", "--prompt", "hi"], capsys)
    assert (rc, errors) == (64, [f"error: s3://***@bucket/dtd/x.jpg: {REFUSED} and use the URI without them"])
    assert SECRET not in printed + printed2 and "AKIAEXAMPLE" not in printed + printed2


def test_a_secret_in_any_error_or_traceback_is_redacted(tmp_path):
    """Defence in depth: whatever a library puts into an exception (botocore echoes bucket names and URIs), the
    process prints it redacted: credentials in URIs and the values of secret variables in the environment."""
    leak = (f"raise RuntimeError(\"Invalid bucket name 'AKIAEXAMPLE:{SECRET}@bucket': signing with {SECRET} failed; "
            f"see https://user:hunter2hunter2@example.com/x\")")
    script = ("import sys\nfrom mysproj import cli\nfrom mysproj.stages import registry\n"
              f"def run(stage, cfg, force=False):\n    {leak}\n"
              "registry.run = run\nsys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "prep", "--dataset", "textures-mini", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET})
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" in printed and "RuntimeError: Invalid bucket name" in printed
    assert SECRET not in printed and "hunter2" not in printed
    assert "signing with *** failed; see https://***@example.com/x" in printed


def test_subprocess_refuses_credentials_in_a_uri_without_printing_them(tmp_path):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = subprocess.run([sys.executable, "-m", "mysproj.cli", "prep", "--dataset", "textures-mini", "--out",
                           f"s3://AKIAEXAMPLE:{SECRET}@bucket/run/prep"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 64
    assert proc.stderr.strip().splitlines() == [f"error: config field 'out' = 's3://***@bucket/run/prep': {REFUSED}"]
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.s3
def test_real_s3_credentials_in_a_uri_are_refused_before_any_request(s3_env, tmp_path, capsys):
    bucket = s3_env.create_bucket("creds-in-uri")[5:]
    uri = f"s3://{s3_env.access_key}:{s3_env.secret_key}@{bucket}/{tmp_path.name}/prep"
    rc, errors, printed = cli(["prep", "--dataset", "textures-mini", "--out", uri, "--max-per-class", "1"], capsys)
    assert (rc, errors) == (64, [f"error: config field 'out' = 's3://***@{bucket}/{tmp_path.name}/prep': {REFUSED}"])
    assert s3_env.secret_key not in printed
    assert s3_env.filesystem().ls(bucket) == []


# ------------------------------------------------------------------------------ clear messages (item 7)

def test_eval_clip_given_a_llava_model_says_so(tiny_model, prep, tmp_path, capsys):
    rc, errors, printed = cli(["eval-clip", "--model", tiny_model, "--data", prep, "--out", tmp_path / "o",
                               "--workers", "0"], capsys)
    assert rc == 64 and errors == [f"error: CLIP model {tiny_model}: this is a LLaVA model; eval-clip needs a CLIP "
                                   f"model (open_clip or HF CLIP)"]
    assert len(printed) < 2000


def test_misspelt_env_variable_is_warned_once_with_the_closest_field(tmp_path, capsys, monkeypatch):
    from mysproj.config import fields

    monkeypatch.setattr(fields, "_WARNED_ENV", set())
    monkeypatch.setenv("MYSPROJ_MAX_PER_CLAS", "1")
    known = {"MYSPROJ_SCRATCH": str(tmp_path), "MYSPROJ_LOG_LEVEL": "INFO", "MYSPROJ_GIT_SHA": "abc",
             "MYSPROJ_STORAGE_RETRY_SECONDS": "120", "MYSPROJ_GLOBAL_BATCH": "8"}  # no warning (the last, a field)
    for name, value in known.items():
        monkeypatch.setenv(name, value)
    argv = ["prep", "--dataset", "textures-mini", "--out", tmp_path / "o", "--max-per-class", "1", "--patch-size",
            "48", "--workers", "1"]
    printed = cli(argv, capsys)[2] + cli(argv, capsys)[2]
    warnings = [ln.split(": ", 1)[1] for ln in printed.splitlines() if " WARNING " in ln and "MYSPROJ_" in ln]
    assert warnings == ["MYSPROJ_MAX_PER_CLAS is set but is not a config field of any stage (ignored); did you mean "
                        "MYSPROJ_MAX_PER_CLASS?"]


def test_every_mysproj_variable_the_project_sets_is_a_field_or_listed():
    """NON_FIELD_ENV is the one list of MYSPROJ_* names that are not config fields: every such name used in the code,
    the chart, the images and CI must be a field of a config class or listed there (else users get false warnings)."""
    import dataclasses
    import re

    from mysproj.config import stages
    from mysproj.config.fields import NON_FIELD_ENV, env_name
    from mysproj.kube.controller import ControllerConfig
    from mysproj.pipeline.dag import PipelineConfig

    classes = [c for c in vars(stages).values() if dataclasses.is_dataclass(c)] + [PipelineConfig, ControllerConfig]
    known = set(NON_FIELD_ENV) | {env_name(f.name) for c in classes for f in dataclasses.fields(c)}
    used = set()
    for top in ("mysproj", "jobs", "charts", "images", "k8s", ".github", "Makefile", "README.md", "docs"):
        for path in [REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"):
            if path.is_file() and path.suffix not in (".json", ".parquet", ".png", ".pt", ".pyc", ".txt") or \
                    path.name.endswith(".schema.json"):
                used |= set(re.findall(r"MYSPROJ_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="ignore")))
    assert sorted(used - known - {"MYSPROJ_FIELD_NAME"}) == []
