"""The torch.compile cache under the run root: a second process loads what the first compiled (a real inductor
compile on CPU), unreadable blobs are skipped with a warning, and the pipeline points every compiling stage at
`<root>/compile-cache`."""

import json
import logging
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

# One stage per URI given, in one process: the first compiles, any later one compiles nothing.
_SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
from mysproj.models import compile_cache

def body():
    f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
    f(torch.randn(8, 8))
    return {}

caches = [compile_cache.run_with(uri, body if i == 0 else dict)["compile_cache"]
          for i, uri in enumerate(sys.argv[1:])]
print(json.dumps({"caches": caches, "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def _stages_in_a_fresh_process(uris: list[str], local_cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": local_cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *uris], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """Two processes with empty local inductor caches (as two pods): the first compiles and stores a blob, the
    second loads it, hits the FX graph cache and stores nothing new."""
    from mysproj.models.compile_cache import environment

    uri = str(tmp_path / "compile-cache")
    first = _stages_in_a_fresh_process([uri], str(tmp_path / "local-1"))
    assert first["caches"][0]["loaded"] == 0 and first["caches"][0]["stored"] and first["hits"] == 0
    assert os.listdir(os.path.join(uri, environment())) == [first["caches"][0]["stored"]]
    second = _stages_in_a_fresh_process([uri], str(tmp_path / "local-2"))
    assert second["caches"][0]["loaded"] > 0 and second["hits"] >= 1 and second["caches"][0]["stored"] is None


def test_unreadable_blobs_are_skipped_with_a_warning(tmp_path, caplog):
    from mysproj.models import compile_cache

    folder = tmp_path / "cc" / compile_cache.environment()
    os.makedirs(folder)
    (folder / "0000.bin").write_bytes(b"not a cache blob")
    with caplog.at_level(logging.WARNING, logger="mysproj.models.compile_cache"):
        summary = compile_cache.run_with(str(tmp_path / "cc"), lambda: {"ran": True})
    assert summary["ran"] is True and summary["compile_cache"]["loaded"] == 0
    assert summary["compile_cache"]["stored"] is None  # nothing compiled, nothing stored
    assert any("0000.bin is unreadable" in r.getMessage() for r in caplog.records)
    assert compile_cache.run_with(None, lambda: {"ran": True}) == {"ran": True}


def test_a_failed_stage_stores_nothing(tmp_path, monkeypatch):
    from mysproj.models import compile_cache

    monkeypatch.setattr(compile_cache, "save", lambda *a: pytest.fail("stored after a failure"))
    with pytest.raises(RuntimeError):
        compile_cache.run_with(str(tmp_path / "cc"), lambda: (_ for _ in ()).throw(RuntimeError("node lost")))


def test_the_pipeline_shares_one_cache_among_compiling_stages():
    from mysproj.config.registry import stages_where
    from mysproj.pipeline.dag import PipelineConfig, build

    compiling = stages_where("compiles")
    assert compiling == ("finetune", "eval-clip", "eval-llava")
    nodes = build(PipelineConfig(root="s3://b/run", overrides={"eval-clip": {"compile_cache": "s3://b/other"}}))
    for n in nodes:
        want = ("s3://b/other" if n.stage == "eval-clip" else "s3://b/run/compile-cache") \
            if n.stage in compiling else None
        assert n.config.get("compile_cache") == want, n.name
    assert {n.stage for n in nodes} >= set(compiling)


@pytest.mark.slow
def test_a_later_stage_in_the_same_process_stores_only_its_own(tmp_path):
    """Two stages in one process (the local runner): the second compiles nothing, so it stores no blob, although
    the process compiled something before it."""
    uris = [str(tmp_path / "a"), str(tmp_path / "b")]
    first, second = _stages_in_a_fresh_process(uris, str(tmp_path / "local"))["caches"]
    assert first["stored"] and second == {"uri": str(tmp_path / "b"), "loaded": 0, "stored": None}
