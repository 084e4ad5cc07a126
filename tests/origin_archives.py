"""Archives in each dataset's published layout (small generated images), and hostile archives, as bytes for the
stage-in tests. The folder layouts come from tests/dataset_layouts.py; this only packs them the way each origin
publishes them."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import zipfile

from dataset_layouts import image_bytes, make_crisismmd, make_dtd, make_imagefolder

PLANTDOC_ODD = ("Tomato leaf late blight/late_blight?w=800&h=600.jpg", "Apple leaf/apple%20scab 1.jpg",
                "Corn leaf blight/leaf&stem (2).jpg")
MACOS_JUNK = ("__MACOSX/crisismmd_datasplit_all/._task_humanitarian_text_img_train.tsv",
              "crisismmd_datasplit_all/._task_humanitarian_text_img_dev.tsv")


def tar_folder(folder: str, arcname: str, compression: str = "gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w") as t:
        t.add(folder, arcname=arcname)
    return buf.getvalue()


def zip_folder(folder: str, arcname: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for base, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(base, name)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                z.write(path, f"{arcname}/{rel}" if arcname else rel)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def dtd_tar_gz() -> bytes:
    """`dtd-r1.0.1.tar.gz`: `dtd/images/<class>/<class>_0001.jpg`, `dtd/labels/{train,val,test}1.txt`."""
    with tempfile.TemporaryDirectory() as tmp:
        make_dtd(tmp, per_split=2)
        return tar_folder(os.path.join(tmp, "dtd"), "dtd")


def plantdoc_zip(sha: str = "6ce5b4b1cde1a7a9b7e4f6ee8b2e0d1f8ad4e4f4") -> bytes:
    """GitHub's archive of the PlantDoc repository: `PlantDoc-Dataset-<sha>/{train,test}/<class>/...`, with the
    odd file names the real one has (`?`, `&`, `%20`, spaces)."""
    with tempfile.TemporaryDirectory() as tmp:
        make_imagefolder(tmp, {"train": {"Apple leaf": 2, "Corn leaf blight": 2}, "test": {"Apple leaf": 1}})
        for i, rel in enumerate(PLANTDOC_ODD):
            path = os.path.join(tmp, "train", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(image_bytes(7000 + i))
        return zip_folder(tmp, f"PlantDoc-Dataset-{sha}")


def dermnet_zip() -> bytes:
    """Kaggle's `dermnet.zip`: `train/<class>/`, `test/<class>/`."""
    with tempfile.TemporaryDirectory() as tmp:
        make_imagefolder(tmp, {"train": {"Acne and Rosacea Photos": 2, "Eczema Photos": 2},
                               "test": {"Acne and Rosacea Photos": 1, "Eczema Photos": 1}})
        return zip_folder(tmp)


def crisismmd_archives() -> tuple[bytes, bytes]:
    """(`CrisisMMD_v2.0.tar.gz` with `CrisisMMD_v2.0/data_image/...`, `crisismmd_datasplit_all.zip` with
    `crisismmd_datasplit_all/*.tsv` and macOS `__MACOSX/` / `._*` entries)."""
    with tempfile.TemporaryDirectory() as tmp:
        make_crisismmd(tmp, {"train": [(None, "infrastructure_and_utility_damage")] * 2,
                             "dev": [(None, "not_humanitarian")],
                             "test": [(None, "rescue_volunteering_or_donation_effort")]})
        images = tar_folder(os.path.join(tmp, "data_image"), "CrisisMMD_v2.0/data_image")
        splits = zip_folder(os.path.join(tmp, "crisismmd_datasplit_all"), "crisismmd_datasplit_all",
                            extra=dict.fromkeys(MACOS_JUNK, b"\x00\x05\x16\x07mac"))
        return images, splits


# ------------------------------------------------------------------------------------------------- hostile

def _tar(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        ok = tarfile.TarInfo("ok/readme.txt")
        ok.size = 2
        t.addfile(ok, io.BytesIO(b"ok"))
        for m in members:
            if m.isfile():
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
            else:
                t.addfile(m)
    return buf.getvalue()


def tar_dotdot() -> bytes:
    return _tar([tarfile.TarInfo("ok/../../evil.txt")])


def tar_absolute() -> bytes:
    return _tar([tarfile.TarInfo("/tmp/evil-absolute.txt")])


def tar_symlink_escape() -> bytes:
    link = tarfile.TarInfo("ok/passwd")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
    return _tar([link])


def tar_hardlink_escape() -> bytes:
    link = tarfile.TarInfo("ok/shadow")
    link.type, link.linkname = tarfile.LNKTYPE, "/etc/shadow"
    return _tar([link])


def zip_dotdot() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok/readme.txt", b"ok")
        z.writestr("../evil.txt", b"x")
    return buf.getvalue()


def zip_symlink_escape() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("ok/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "../../outside")
    return buf.getvalue()
