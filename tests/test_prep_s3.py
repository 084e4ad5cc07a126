"""prep against a real S3 server (SeaweedFS, credentials enforced): reading the dataset from and writing the
output to object storage, wrong credentials, a server crash mid-write, and skip-on-rerun."""

import os

import pytest
from dataset_layouts import make_dtd, write_truncated_jpeg

from mysproj.cli import main
from mysproj.data.prepared import PreparedData
from mysproj.errors import EXIT_BAD_INPUT, IncompleteOutput
from mysproj.storage import exists, list_files
from mysproj.storage.manifest import MANIFEST, StageInput, StageOutput

pytestmark = pytest.mark.s3


def _upload(server, local_root: str, target: str) -> str:
    fs = server.filesystem()
    for root, _, names in os.walk(local_root):
        for n in names:
            full = os.path.join(root, n)
            fs.put_file(full, f"{target}/{os.path.relpath(full, local_root)}")
    return f"s3://{target}"


@pytest.fixture
def dtd_in_s3(s3_env, tmp_path):
    bucket = s3_env.create_bucket("datasets")
    local = make_dtd(str(tmp_path / "src"), classes=("banded", "blotchy"), per_split=2)
    write_truncated_jpeg(os.path.join(local, "images", "banded", "banded_bad.jpg"))
    with open(os.path.join(local, "labels", "train1.txt"), "a") as f:
        f.write("banded/banded_bad.jpg\n")
    return _upload(s3_env, local, f"{bucket[5:]}/{tmp_path.name}/dtd")


def _argv(src, out):
    return ["prep", "--dataset", "dtd", "--source", src, "--out", out, "--workers", "2"]


def test_prep_reads_and_writes_s3_and_skips_a_second_run(s3_env, dtd_in_s3, tmp_path, capsys):
    out = f"{s3_env.create_bucket('runs')}/{tmp_path.name}/dtd/prep"
    assert main(_argv(dtd_in_s3, out)) == 0
    assert "prep: done" in capsys.readouterr().out
    data = PreparedData(out)
    train = data.samples("train")
    assert data.classes == ["banded", "blotchy"] and len(train) == 4 and len(data.samples("test")) == 4
    assert all(s.image.startswith(dtd_in_s3 + "/images/") for s in train)
    local = data.local_image(train[0])  # staged into the local cache once, verified
    assert local.startswith(os.environ["MYSPROJ_CACHE_DIR"]) and data.open_image(train[0]).size == (24, 16)
    assert data.report()["skipped"][0]["reason"].startswith("corrupt image")
    assert data.llava_records("train")[0]["image"] == train[0].image
    finished = StageInput(out).manifest["finished"]

    assert main(_argv(dtd_in_s3, out)) == 0
    assert "prep: skipped (already complete)" in capsys.readouterr().out
    assert StageInput(out).manifest["finished"] == finished


def test_wrong_credentials_fail_with_one_clear_error(s3_env, dtd_in_s3, tmp_path, monkeypatch, capsys):
    out = f"{s3_env.create_bucket('runs')}/{tmp_path.name}/prep"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(_argv(dtd_in_s3, out)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "access denied" in errors[0] and "AWS_SECRET_ACCESS_KEY" in errors[0]
    assert "Traceback" not in err


def test_server_killed_mid_write_leaves_no_manifest_and_rerun_completes(s3_env, dtd_in_s3, tmp_path, monkeypatch,
                                                                        capsys):
    out = f"{s3_env.create_bucket('runs')}/{tmp_path.name}/prep"
    monkeypatch.setenv("MYSPROJ_STORAGE_RETRY_SECONDS", "1")  # give up quickly once the server is gone
    original = StageOutput.write_bytes

    def crash_before_llava_json(self, name, data):
        if name == "llava_train.json":
            s3_env.stop(kill=True)
        return original(self, name, data)

    monkeypatch.setattr(StageOutput, "write_bytes", crash_before_llava_json)
    assert main(_argv(dtd_in_s3, out)) == 1  # retryable (not exit 64), one line stating the retry budget
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MYSPROJ_STORAGE_RETRY_SECONDS" in errors[0], errors
    monkeypatch.setattr(StageOutput, "write_bytes", original)

    s3_env.start()
    written = list_files(out)
    assert "samples.parquet" in written and MANIFEST not in written  # half-written, not visible as complete
    with pytest.raises(IncompleteOutput, match="no _SUCCESS.json"):
        PreparedData(out)
    assert main(_argv(dtd_in_s3, out)) == 0
    assert exists(f"{out}/{MANIFEST}")
    assert len(PreparedData(out).llava_records("train")) == 4
