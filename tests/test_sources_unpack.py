"""Safe unpacking of the datasets' published archives, and refusal of hostile ones."""

from __future__ import annotations

import gzip
import importlib
import io
import os
import tarfile

import origin_archives as arch
import pytest

from mysproj.errors import BadInput
from mysproj.sources import unpack
from mysproj.sources.unpack import kind


@pytest.fixture(autouse=True, params=[True, False], ids=["tarfile-filters", "own-checks"])
def tar_filters(request, monkeypatch):
    """Every case with tarfile's `data` filter and with the checks made where the interpreter has none (Debian
    12's Python 3.11.2, the offline image base)."""
    module = importlib.import_module("mysproj.sources.unpack")  # the package exports the function by that name
    if request.param and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filters")
    monkeypatch.setattr(module, "HAS_FILTERS", request.param)
    return request.param


def test_devices_set_id_bits_and_owners_do_not_come_from_an_archive(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("bin/tool")
        info.size, info.mode, info.uid, info.gid = 4, 0o6777, 4242, 4242
        t.addfile(info, io.BytesIO(b"tool"))
    out = tmp_path / "out"
    assert unpack(_write(tmp_path, "a.tar", buf.getvalue()), str(out)) == ["bin/tool"]
    st = os.stat(out / "bin" / "tool")
    assert not st.st_mode & 0o6022 and st.st_uid == os.getuid()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("dev/null-ish")
        info.type = tarfile.CHRTYPE
        t.addfile(info)
    with pytest.raises(BadInput, match="device"):
        unpack(_write(tmp_path, "b.tar", buf.getvalue()), str(tmp_path / "out2"))


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_dtd_tar_gz_in_its_published_layout(tmp_path):
    names = unpack(_write(tmp_path, "dtd-r1.0.1.tar.gz", arch.dtd_tar_gz()), str(tmp_path / "out"))
    assert "dtd/images/banded/banded_0001.jpg" in names
    assert {f"dtd/labels/{s}1.txt" for s in ("train", "val", "test")} <= set(names)
    assert all((tmp_path / "out" / n).is_file() for n in names)


def test_kind_comes_from_the_bytes_not_the_name(tmp_path):
    """A `.tar.gz` that is a plain tar (as DTD's may be), and a zip named `.tar.gz`."""
    with tarfile.open(fileobj=io.BytesIO(arch.dtd_tar_gz())) as t:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as plain:
            for m in t.getmembers():
                plain.addfile(m, t.extractfile(m) if m.isfile() else None)
    tar_named_gz = _write(tmp_path, "plain.tar.gz", buf.getvalue())
    zip_named_tgz = _write(tmp_path, "dermnet.tar.gz", arch.dermnet_zip())
    assert kind(tar_named_gz) == "tar" and kind(zip_named_tgz) == "zip"
    assert "dtd/labels/train1.txt" in unpack(tar_named_gz, str(tmp_path / "a"))
    assert any(n.startswith("train/Eczema Photos/") for n in unpack(zip_named_tgz, str(tmp_path / "b")))


def test_plantdoc_zip_keeps_odd_names_exactly(tmp_path):
    names = unpack(_write(tmp_path, "master.zip", arch.plantdoc_zip("abc123")), str(tmp_path / "out"))
    for rel in arch.PLANTDOC_ODD:
        assert f"PlantDoc-Dataset-abc123/train/{rel}" in names
        assert (tmp_path / "out" / "PlantDoc-Dataset-abc123" / "train" / rel).is_file()


def test_crisismmd_into_sub_folder_and_macos_entries_skipped(tmp_path):
    images, splits = arch.crisismmd_archives()
    out = str(tmp_path / "out")
    img_names = unpack(_write(tmp_path, "CrisisMMD_v2.0.tar.gz", images), out)
    split_names = unpack(_write(tmp_path, "crisismmd_datasplit_all.zip", splits), out, into="CrisisMMD_v2.0")
    assert all(n.startswith("CrisisMMD_v2.0/data_image/hurricane_harvey/") for n in img_names)
    assert sorted(split_names) == [f"CrisisMMD_v2.0/crisismmd_datasplit_all/task_humanitarian_text_img_{s}.tsv"
                                   for s in ("dev", "test", "train")]
    assert not os.path.exists(os.path.join(out, "CrisisMMD_v2.0", "__MACOSX"))


def test_a_file_that_is_no_archive_stays_a_plain_file(tmp_path):
    gz = _write(tmp_path, "weights.bin.gz", gzip.compress(b"not a tar"))
    plain = _write(tmp_path, "notes.txt", b"hello")
    assert unpack(plain, str(tmp_path / "out"), into="docs") == ["docs/notes.txt"]
    assert unpack(gz, str(tmp_path / "out")) == ["weights.bin.gz"]
    assert (tmp_path / "out" / "docs" / "notes.txt").read_bytes() == b"hello"


@pytest.mark.parametrize("build, needle", [
    (arch.tar_dotdot, ".."), (arch.tar_absolute, "absolute"), (arch.tar_symlink_escape, "outside"),
    (arch.tar_hardlink_escape, "absolute"), (arch.zip_dotdot, ".."), (arch.zip_symlink_escape, "outside")])
def test_hostile_archives_are_refused_before_anything_is_written(tmp_path, build, needle):
    archive = _write(tmp_path, "evil.archive", build())
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(BadInput) as e:
        unpack(archive, str(out))
    assert archive in str(e.value) and needle in str(e.value)
    assert list(out.iterdir()) == []  # not even the harmless member
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "deep" / "er" / "outside").exists()


def test_fetch_then_unpack_as_the_fetch_stage_does(http_origin, tmp_path):
    """DTD pinned by sha256, CrisisMMD's images and its split zip `into` the images' folder: the output holds the
    layouts the prep stages read."""
    import hashlib

    from mysproj.sources import download, parse

    images, splits = arch.crisismmd_archives()
    dtd = arch.dtd_tar_gz()
    uris = [f"{http_origin.add('dtd-r1.0.1.tar.gz', dtd)}#sha256={hashlib.sha256(dtd).hexdigest()}",
            http_origin.add("CrisisMMD_v2.0.tar.gz", images),
            f"{http_origin.add('crisismmd_datasplit_all.zip', splits)}#into=CrisisMMD_v2.0"]
    out = tmp_path / "out"
    for uri in uris:
        origin = parse(uri)
        rec = download(origin, str(tmp_path / "dl"), parts_uri=str(tmp_path / "parts" / origin.key()),
                       chunk_size=4096, connections=3)
        for name in rec["files"]:
            unpack(str(tmp_path / "dl" / name), str(out), into=origin.into)
    assert (out / "dtd" / "labels" / "test1.txt").is_file()
    assert (out / "CrisisMMD_v2.0" / "crisismmd_datasplit_all" / "task_humanitarian_text_img_dev.tsv").is_file()
    assert any((out / "CrisisMMD_v2.0" / "data_image" / "hurricane_harvey").iterdir())
