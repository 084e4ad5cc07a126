"""The fetch stage and the DAG's fetch nodes: datasets named by their public origins (served on loopback by a real
HTTP server that honours Range), fetched once per cache, verified, and read by prep as any folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile

import pytest
import s3fs
from dataset_layouts import make_dtd, make_imagefolder
from stage_runs import cli

from mysproj.config.datasets import RECORDS
from mysproj.config.fields import ConfigError, load_config
from mysproj.config.stages import CLIP_ORIGIN, LLAVA_ORIGIN, FetchConfig
from mysproj.errors import BadInput
from mysproj.pipeline import dag
from mysproj.sources.github import blob_id
from mysproj.stages import fetch, registry
from mysproj.storage import uri as U
from mysproj.storage.manifest import StageInput, read_manifest


def pipeline(**values) -> dag.PipelineConfig:
    return load_config(dag.PipelineConfig, overrides=values, env={})


def nodes_by_name(cfg) -> dict[str, dag.Node]:
    return {n.name: n for n in dag.build(cfg)}


# -- the DAG ------------------------------------------------------------------------------------------------------

def test_a_dataset_left_out_of_sources_is_fetched_from_its_origin_once_per_cache(tmp_path):
    nodes = nodes_by_name(pipeline(root=str(tmp_path / "runs/a"), datasets=["dtd", "plantdoc"], strategies=[],
                                   zero_shot=False, probe=False))
    fetches = {n: node for n, node in nodes.items() if node.stage == "fetch"}
    assert len(fetches) == 2
    dtd = next(n for n in fetches.values() if n.config["source"] == list(RECORDS["dtd"].origin))
    assert dtd.config["out"].startswith(str(tmp_path / "runs/cache/sources/dtd-r1.0.1-"))
    assert nodes["dtd/prep"].config["source"] == dtd.config["out"] and dtd.name in nodes["dtd/prep"].deps
    # another run root beside it: the same fetch outputs (a second run downloads nothing)
    other = nodes_by_name(pipeline(root=str(tmp_path / "runs/b"), datasets=["dtd"], strategies=[],
                                   zero_shot=False, probe=False))
    assert other["dtd/prep"].config["source"] == dtd.config["out"]
    # a path source is read in place: no fetch
    local = nodes_by_name(pipeline(root=str(tmp_path / "r"), datasets=["dtd"], sources={"dtd": "/data/dtd"},
                                   strategies=[], zero_shot=False, probe=False))
    assert not any(n.stage == "fetch" for n in local.values()) and local["dtd/prep"].deps == []


def test_model_origins_fetch_the_tower_once_and_share_it_with_clip_zero_shot(tmp_path):
    nodes = nodes_by_name(pipeline(root=str(tmp_path / "r"), datasets=["textures-mini"], strategies=["projector"],
                                   base_model=LLAVA_ORIGIN, clip_model=CLIP_ORIGIN, cache=str(tmp_path / "c")))
    fetches = [n for n in nodes.values() if n.stage == "fetch"]
    clip = next(n for n in fetches if n.config["content"] == "clip")
    llava = next(n for n in fetches if n.config["content"] == "llava")
    assert len(fetches) == 2 and llava.config["tower"] == clip.config["out"] and llava.deps == [clip.name]
    assert nodes["textures-mini/zero-shot/eval-clip"].config["model"] == clip.config["out"]
    ft = nodes["textures-mini/ft-projector/seed0/finetune"]
    assert ft.config["model"] == llava.config["out"] and llava.name in ft.deps
    assert nodes["textures-mini/ft-projector/seed0/merge"].config["base"] == llava.config["out"]
    assert not any(n.stage == "model-init" for n in nodes.values())
    assert all(n.config["out"].startswith(str(tmp_path / "c/sources/")) for n in fetches)


@pytest.mark.parametrize("values, message", [
    ({"datasets": ["crisismmd"]}, "terms you must accept first (https://crisisnlp.qcri.org/crisismmd)"),
    ({"datasets": ["imagefolder"]}, "no entry for dataset 'imagefolder'"),
    ({"datasets": ["dtd"], "accept_terms": ["mnist"]}, "accept_terms"),
    ({"datasets": ["dtd"], "sources": {"dtd": ["https://h/a.tar", "/local/b"]}}, "a list must hold origin URIs"),
    ({"datasets": ["dtd"], "sources": {"dtd": "https://h/dtd.tar.gz#sha256=abc"}}, "not 64 hex digits"),
])
def test_pipeline_refuses_sources_it_cannot_fetch(values, message):
    with pytest.raises(BadInput, match=None) as e:
        dag.build(pipeline(root="/tmp/x", **values))
    assert message in str(e.value)


def test_accepting_the_terms_fetches_both_crisismmd_archives_into_one_folder(tmp_path):
    nodes = nodes_by_name(pipeline(root=str(tmp_path / "r"), datasets=["crisismmd"], accept_terms=["crisismmd"],
                                   strategies=[], zero_shot=False, probe=False))
    (node,) = [n for n in nodes.values() if n.stage == "fetch"]
    assert node.config["source"] == list(RECORDS["crisismmd"].origin) and len(node.config["source"]) == 2


# -- the stage on loopback ------------------------------------------------------------------------------------------

def _tar_gz(folder: str, top: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(os.path.join(folder, top), arcname=top)
    return buf.getvalue()


@pytest.fixture
def dtd_archive(tmp_path, http_origin):
    """A DTD tarball as published (`dtd/images/…`, `dtd/labels/…`) on the loopback server; its pinned URL."""
    make_dtd(str(tmp_path / "src"), per_split=2)
    data = _tar_gz(str(tmp_path / "src"), "dtd")
    url = http_origin.add("dtd-r1.0.1.tar.gz", data)
    return f"{url}#sha256={hashlib.sha256(data).hexdigest()}", len(data)


def test_prep_reads_an_https_source_as_it_reads_a_folder(tmp_path, dtd_archive, monkeypatch, capsys):
    url, _ = dtd_archive
    monkeypatch.setenv("MYSPROJ_FETCH_CACHE", str(tmp_path / "cache"))
    from_url, from_folder = str(tmp_path / "prep-url"), str(tmp_path / "prep-folder")
    assert cli(["prep", "--dataset", "dtd", "--source", url, "--out", from_url], capsys)[0] == 0
    assert cli(["prep", "--dataset", "dtd", "--source", tmp_path / "src", "--out", from_folder], capsys)[0] == 0
    a, b = StageInput(from_url), StageInput(from_folder)
    assert a.read_text("classes.json") == b.read_text("classes.json")
    assert [a.manifest["summary"][k] for k in ("classes", "train", "test")] == \
        [b.manifest["summary"][k] for k in ("classes", "train", "test")] and a.manifest["summary"]["train"] > 0
    (fetched,) = [d for d in os.listdir(tmp_path / "cache/sources")]
    manifest = read_manifest(str(tmp_path / "cache/sources" / fetched))
    assert manifest["stage"] == "fetch" and manifest["summary"]["origins"][0]["verified"] == "sha256 pin"
    assert not os.path.exists(tmp_path / "cache/sources" / fetched / fetch.PARTIAL)


def test_wrong_sha256_is_one_error_and_nothing_complete(tmp_path, http_origin, dtd_archive, capsys):
    url, _ = dtd_archive
    bad = url.split("#")[0] + "#sha256=" + "0" * 64
    out = str(tmp_path / "f")
    rc, errors, _ = cli(["fetch", "--source", bad, "--out", out], capsys)
    assert rc == 64 and len(errors) == 1 and "sha256" in errors[0]
    assert read_manifest(out) is None


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_killed_fetch_resumes_from_the_pieces_it_kept(where, tmp_path, http_origin, monkeypatch, request):
    make_dtd(str(tmp_path / "src"), per_split=1)
    # 4 MiB that do not compress: the archive spans five 1 MiB pieces
    (tmp_path / "src/dtd/imdb").mkdir()
    (tmp_path / "src/dtd/imdb/imdb.mat").write_bytes(os.urandom(4 << 20))
    data = _tar_gz(str(tmp_path / "src"), "dtd")
    url = http_origin.add("dtd-r1.0.1.tar.gz", data) + f"#sha256={hashlib.sha256(data).hexdigest()}"
    monkeypatch.setenv("MYSPROJ_FETCH_RETRY_SECONDS", "1")
    monkeypatch.setattr("mysproj.sources.http.RETRY_SECONDS", 1.0)
    out = str(tmp_path / "f")
    if where == "s3":
        s3 = request.getfixturevalue("s3_env")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        out = f"{s3.create_bucket('fetch-resume')}/{tmp_path.name}/f"
    cfg = FetchConfig(source=[url], out=out, chunk_mib=1, connections=1)
    # the server stops serving the file after a few responses, as a pod killed mid-download stops
    http_origin.faults.budget["dtd-r1.0.1.tar.gz"] = 3
    with pytest.raises(BadInput):
        registry.run("fetch", cfg)
    first = http_origin.served("dtd-r1.0.1.tar.gz")
    assert read_manifest(out) is None and U.list_files(U.join(out, fetch.PARTIAL))
    del http_origin.faults.budget["dtd-r1.0.1.tar.gz"]
    if where == "s3":  # the retry is a new pod: nothing cached from the first attempt
        s3fs.S3FileSystem.clear_instance_cache()
    manifest = registry.run("fetch", cfg)
    second = http_origin.served("dtd-r1.0.1.tar.gz") - first
    assert 0 < second < len(data) and manifest["summary"]["bytes_fetched"] <= second
    assert "dtd/labels/train1.txt" in manifest["files"]
    s3fs.S3FileSystem.clear_instance_cache()  # what is there now, as another reader sees it
    # no object below it is left (SeaweedFS keeps the emptied folder, which answers HEAD but lists nothing)
    assert not [f for f in U.list_files(out) if f.startswith(f"{fetch.PARTIAL}/")], U.list_files(out)
    # complete: a second request of the same origin downloads nothing
    again = registry.run("fetch", cfg)
    assert again.get("skipped") and http_origin.served("dtd-r1.0.1.tar.gz") - first == second


def test_github_origin_verifies_every_file_against_the_commits_tree(tmp_path, http_origin, monkeypatch, capsys):
    sha = "5467f6012d78d1c446145d5f582da6096f852ae8"
    src = tmp_path / "src"
    make_imagefolder(str(src), {"train": {"Apple leaf": 2, "Corn rust leaf?": 2}, "test": {"Apple leaf": 1,
                                                                                         "Corn rust leaf?": 1}})
    files = {os.path.relpath(os.path.join(r, n), src).replace(os.sep, "/"): os.path.join(r, n)
             for r, _, names in os.walk(src) for n in names}
    tree = {"sha": sha, "truncated": False,
            "tree": [{"path": rel, "mode": "100644", "type": "blob", "sha": blob_id(path)}
                     for rel, path in files.items()]}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, path in files.items():
            z.write(path, f"PlantDoc-Dataset-{sha}/{rel}")
    http_origin.add(f"pratikkayal/PlantDoc-Dataset/archive/{sha}.zip", buf.getvalue())
    http_origin.add(f"repos/pratikkayal/PlantDoc-Dataset/git/trees/{sha}", json.dumps(tree).encode())
    monkeypatch.setenv("MYSPROJ_GITHUB_URL", http_origin.endpoint)
    monkeypatch.setenv("MYSPROJ_GITHUB_API_URL", http_origin.endpoint)
    origin = RECORDS["plantdoc"].origin[0]
    out, prep = str(tmp_path / "f"), str(tmp_path / "prep")
    manifest = registry.run("fetch", FetchConfig(source=[origin], out=out))
    assert manifest["summary"]["origins"][0]["verified"].startswith("git blob ids")
    assert cli(["prep", "--dataset", "plantdoc", "--source", out, "--out", prep], capsys)[0] == 0
    assert "Corn rust leaf?" in StageInput(prep).read_json("classes.json")["classes"]
    # one file changed in the archive: refused, nothing complete
    tree["tree"][0]["sha"] = "0" * 40
    http_origin.add(f"repos/pratikkayal/PlantDoc-Dataset/git/trees/{sha}", json.dumps(tree).encode())
    rc, errors, _ = cli(["fetch", "--source", origin, "--out", tmp_path / "g"], capsys)
    assert rc == 64 and len(errors) == 1 and "differs from the commit's file" in errors[0]
    assert read_manifest(str(tmp_path / "g")) is None


def test_mysproj_run_with_an_https_source_then_a_second_root_downloads_nothing(tmp_path, dtd_archive, http_origin,
                                                                              capsys):
    url, size = dtd_archive
    overrides = {"prep": {"max_per_class": 1}}
    served = []
    for root in ("a", "b"):
        cfg = tmp_path / f"{root}.yaml"
        cfg.write_text(json.dumps({"root": str(tmp_path / "runs" / root), "datasets": ["dtd"],
                                   "sources": {"dtd": url}, "strategies": [], "zero_shot": False, "probe": False,
                                   "overrides": overrides}))
        assert cli(["run", "--config", cfg, "--only", "fetch/,dtd/prep"], capsys)[0] == 0
        served.append(http_origin.served("dtd-r1.0.1.tar.gz"))
    assert served[0] >= size and served[1] == served[0]
    assert read_manifest(str(tmp_path / "runs/b/dtd/prep"))["stage"] == "prep"


def test_fetching_a_path_is_refused(tmp_path, capsys):
    rc, errors, _ = cli(["fetch", "--source", tmp_path, "--out", tmp_path / "f"], capsys)
    assert rc == 64 and len(errors) == 1 and "read it in place" in errors[0]


def test_fetch_needs_a_source_and_an_origin_where_none_is_accepted_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'source' is empty"):
        load_config(FetchConfig, overrides={"out": "/tmp/x"}, env={})
    rc, errors, _ = cli(["merge", "--base", tmp_path / "base", "--projector", "hf://org/projector@main",
                         "--out", tmp_path / "m"], capsys)
    assert rc == 64 and len(errors) == 1 and "'projector'" in errors[0] and "not accepted here" in errors[0]
