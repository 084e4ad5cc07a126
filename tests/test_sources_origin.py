"""Source URIs: parsing, pins, keys and names; storage origins pass through."""

from __future__ import annotations

import os

import pytest

from mysproj.errors import BadInput
from mysproj.sources import download, is_remote, parse, resolve

SHA = "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"
DTD = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_https_with_pip_pin_and_into():
    o = parse(f"{DTD}#sha256={SHA.upper()}&into=textures")
    assert (o.scheme, o.uri, o.sha256, o.into) == ("http", DTD, SHA, "textures")
    assert o.pinned and o.name() == "dtd-r1.0.1"
    assert not parse(DTD).pinned


def test_hf_forms():
    o = parse("hf://liuhaotian/llava-v1.5-7b")
    assert (o.scheme, o.repo, o.repo_type, o.revision, o.pinned) == ("hf", "liuhaotian/llava-v1.5-7b", "model",
                                                                       None, False)
    assert o.name() == "llava-v1.5-7b"
    d = parse("hf://datasets/QCRI/CrisisMMD@v2")
    assert (d.repo, d.repo_type, d.revision, d.pinned) == ("QCRI/CrisisMMD", "dataset", "v2", False)
    assert parse("hf://llava-hf/llava-1.5-7b-hf@95f2cf316249a98c11183f471ab76065c3e5f494").pinned


def test_kaggle_forms():
    o = parse("kaggle://shubhamgoel27/dermnet/versions/1")
    assert (o.scheme, o.repo, o.revision, o.pinned, o.name()) == ("kaggle", "shubhamgoel27/dermnet", "1", True,
                                                                    "dermnet")
    assert not parse("kaggle://shubhamgoel27/dermnet").pinned


def test_keys_are_stable_and_tell_origins_apart():
    a = parse(f"{DTD}#sha256={SHA}")
    assert a.key() == parse(f"{DTD}#sha256={SHA.upper()}").key() and len(a.key()) == 16
    keys = {a.key(), parse(DTD).key(), parse(f"{DTD}#sha256={SHA}&into=x").key(),
            parse("hf://o/r@" + "a" * 40).key(), parse("hf://datasets/o/r@" + "a" * 40).key(),
            parse("kaggle://o/r/versions/1").key(), parse("kaggle://o/r/versions/2").key()}
    assert len(keys) == 7


@pytest.mark.parametrize("uri, needle", [
    (f"{DTD}#sha256=abc", "64 hex"), (f"{DTD}#md5=abc", "unknown"), (f"{DTD}#into=../x", "'..'"),
    ("https://host.only/", "file path"), ("hf://just-one", "ORG/REPO"), ("hf://a/b/c", "ORG/REPO"),
    ("hf://a/b@", "empty revision"), ("kaggle://o/d/versions/x", "positive number"), ("kaggle://o", "OWNER/DATASET"),
    ("https://user:pw@example.org/x.zip", "credentials"), ("", "empty"), ("/data/x#sha256=" + SHA, "apply to"),
    ("nosuch://x/y", "unknown URI scheme")])
def test_malformed_uris_are_one_line_naming_them(uri, needle):
    with pytest.raises(BadInput) as e:
        parse(uri)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "pw@" not in str(e.value)


def test_storage_origins_pass_through(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}", "s3://bucket/prefix/dtd"):
        o = parse(uri)
        assert o.scheme == "storage" and o.uri == uri and not is_remote(uri) and resolve(o) == o
        rec = download(o, str(tmp_path / "unused"), parts_uri=None)
        assert rec["files"] == {} and rec["bytes_fetched"] == 0 and rec["verified"] == "read in place"
    assert not (tmp_path / "unused").exists()
    assert all(is_remote(u) for u in (DTD, "http://x/y", "hf://o/r", "kaggle://o/d", "HTTPS://X/y"))


def test_sources_are_storage_level_without_ml_imports():
    import os
    import subprocess
    import sys

    code = ("import sys\nimport mysproj.sources, mysproj.sources.http, mysproj.sources.hub, mysproj.sources.kaggle\n"
            "import huggingface_hub, kagglesdk\n"
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": REPO}).stdout
    assert out.strip() == "[]"


def test_hf_include_exclude_globs_are_part_of_the_origin():
    o = parse("hf://openai/clip-vit-large-patch14-336#exclude=*.h5,*.msgpack")
    assert o.exclude == ("*.h5", "*.msgpack") and o.wants("pytorch_model.bin") and not o.wants("tf_model.h5")
    i = parse("hf://llava-hf/llava-1.5-7b-hf#include=*.json,*.safetensors,tokenizer*")
    assert i.wants("model-00001-of-00003.safetensors") and i.wants("tokenizer.json") and not i.wants("x.bin")
    assert len({o.key(), i.key(), parse("hf://openai/clip-vit-large-patch14-336").key()}) == 3
    with pytest.raises(BadInput, match="does not apply"):
        parse(f"{DTD}#include=*.jpg")
    with pytest.raises(BadInput, match="does not apply"):
        parse("hf://o/r#sha256=" + SHA)
