"""The pipeline controller and `mysproj status` against an in-memory API (same dict shapes as the real one; the real
API server runs them in tests/kube/test_pipeline_e2e.py). Stage outputs live in a local run root."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from fake_cluster import complete_output, make_controller

from mysproj import process
from mysproj.config.fields import config_hash, load_config
from mysproj.errors import EXIT_BAD_INPUT
from mysproj.kube import controller as C
from mysproj.kube import jobspec, table, watch
from mysproj.pipeline import dag
from mysproj.stages.registry import stage_config
from mysproj.storage import join, write_text


def test_stage_config_round_trips_through_job_env():
    nodes = dag.build(load_config(dag.PipelineConfig, env={}, overrides={
        "root": "s3://b/r", "datasets": ["dtd", "crisismmd"], "sources": {"dtd": "s3://d/dtd", "crisismmd": "s3://c"},
        "strategies": ["projector", "full", "lora"], "overrides": {"prep": {"crisismmd_merge": {"a": "b"}}}}))
    for node in nodes:
        cfg = stage_config(node.stage, node.config)
        env = {e["name"]: e["value"] for e in jobspec.config_env(cfg)}
        again = load_config(type(cfg), env=env)
        assert dataclasses.asdict(again) == dataclasses.asdict(cfg), node.name
        assert config_hash(again) == config_hash(cfg)


def test_job_names_are_short_unique_readable_and_follow_the_config():
    pipe = load_config(dag.PipelineConfig, env={}, overrides={
        "root": "s3://b/r", "datasets": ["dtd", "plantdoc", "dermnet", "crisismmd"],
        "sources": {d: f"s3://d/{d}" for d in ("dtd", "plantdoc", "dermnet", "crisismmd")},
        "seeds": [0, 1, 2, 3, 4], "strategies": ["projector", "full", "lora"]})
    nodes = dag.build(pipe)
    for release in ("a-very-long-release-name-mysproj", "run-plantdoc-mysproj", "x" * 63):
        names = [n for node in nodes for n in jobspec.job_names(release, node, stage_config(node.stage, node.config),
                                                                nodes_per_finetune=2)]
        assert len(names) == len(set(names))
        assert all(len(n) <= jobspec.MAX_JOB_NAME and n[0].isalnum() and n[-1].isalnum() for n in names)
        # Words are only ever shortened from their end: each is the start of a word of the release or the node name.
        for node in nodes:
            source = set(release.split("-")) | set(re.split(r"[^a-z0-9]+", node.name)) | {"zs", "proj", "s0", "s1",
                                                                                       "s2", "s3", "s4"}
            name = jobspec.job_names(release, node, stage_config(node.stage, node.config))[0]
            assert all(any(w.startswith(part) for w in source) for part in name.split("-")[:-1]), name
        # One run, one prefix: every Job name of the run starts with the same words.
        assert len({n.split("-" + n.split("-")[-1])[0][:8] for n in names}) == 1
    ft = next(n for n in nodes if n.name == "plantdoc/ft-projector/seed0/finetune")
    name = jobspec.job_names("run-plantdoc-mysproj", ft, stage_config(ft.stage, ft.config))[0]
    assert name.startswith("run-plantdoc-plantdoc-proj-s0-finetune-")  # not run-plant-myspro-lantdoc-...
    ft = next(n for n in nodes if n.stage == "finetune")
    changed = dataclasses.replace(stage_config(ft.stage, ft.config), lr=0.5)
    assert jobspec.job_names("r", ft, changed) != jobspec.job_names("r", ft, stage_config(ft.stage, ft.config))
    twins = [jobspec.job_names(f"experiment-dtd-seed-{x}-mysproj", ft, stage_config(ft.stage, ft.config)) for x in "ab"]
    assert twins[0] != twins[1]  # same visible prefix, different runs


def test_controller_runs_the_dag_in_order_with_owners(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    first = ctl.step()
    created = cluster.stage_jobs()
    # No dependencies: the two model inits and prep. Nothing that needs them exists yet.
    assert set(created) == {"models/tiny", "models/clip-tiny", "textures-mini/prep"}
    assert set(first.created) == set(created.values())
    job = cluster.jobs[created["textures-mini/prep"]]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-ctl"
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MYSPROJ_DATASET"] == "textures-mini" and env["MYSPROJ_OUT"].endswith("run/textures-mini/prep")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["jobs/stage.py", "prep"]
    assert job["metadata"]["labels"]["mysproj.io/stage"] == "prep"
    for name in list(created.values()):
        cluster.finish(name)
    ctl.step()
    assert "textures-mini/ft-projector/seed0/finetune" in cluster.stage_jobs()
    assert "textures-mini/ft-projector/seed0/merge" not in cluster.stage_jobs()
    for _ in range(10):
        for name in cluster.stage_jobs().values():
            if "succeeded" not in cluster.jobs[name]["status"]:
                cluster.finish(name)
        result = ctl.step()
        if result.done:
            break
    assert result.done and not result.failed
    assert set(cluster.stage_jobs()) == {n.name for n in ctl.nodes}
    assert ctl.run() == 0


def test_complete_outputs_are_reused_and_a_restart_creates_nothing_twice(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    complete_output(ctl, "textures-mini/prep")
    complete_output(ctl, "models/tiny")
    ctl.step()
    assert set(cluster.stage_jobs()) == {"models/clip-tiny", "textures-mini/ft-projector/seed0/finetune",
                                         "textures-mini/zero-shot/seed0/probe", "textures-mini/zero-shot/eval-llava"}
    before = dict(cluster.jobs)
    restarted, _ = make_controller(tmp_path, cluster)  # a new process: state only from the cluster and the bucket
    result = restarted.step()
    assert result.created == [] and cluster.jobs.keys() == before.keys()
    assert result.states["textures-mini/prep"].state == "reused"


def test_gpu_jobs_are_capped(tmp_path):
    ctl, cluster = make_controller(tmp_path, max_parallel_gpu_jobs=2)
    for node in ("textures-mini/prep", "models/tiny", "models/clip-tiny"):
        complete_output(ctl, node)
    result = ctl.step()  # four GPU stages are ready: finetune, zero-shot eval-clip, eval-llava, probe
    gpu_jobs = [n for n, j in cluster.jobs.items() if j["metadata"]["labels"].get(jobspec.LABEL_GPU) == "true"]
    assert len(gpu_jobs) == 2
    assert sum(s.reason == "GPU job cap reached" for s in result.states.values()) == 2
    cluster.finish(gpu_jobs[0])
    ctl.step()
    assert sum(j["metadata"]["labels"].get(jobspec.LABEL_GPU) == "true" for j in cluster.jobs.values()) == 3


def test_bad_input_exit_fails_the_run_even_without_pod_failure_policy(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]
    out = ctl.configs["textures-mini/prep"].out
    write_text(join(out, jobspec.FAILURE_RECORD), json.dumps(
        {"exit_code": EXIT_BAD_INPUT, "error": "source s3://x/dtd: no such folder", "job": prep}))
    cluster.finish(prep, exit_code=EXIT_BAD_INPUT)  # the Job is still active: 1.20 would retry it
    result = ctl.step()
    assert list(result.failed) == ["textures-mini/prep"]
    reason = result.failed["textures-mini/prep"].reason
    assert "exit 64" in reason and "no such folder" in reason
    assert cluster.stopped[prep][jobspec.ANN_FAILURE] == reason  # no more retries, reason kept on the Job
    rows = {r.node: r for r in table.collect(cluster, "r1")}
    assert rows["textures-mini/prep"].state == "failed" and "no such folder" in rows["textures-mini/prep"].reason
    assert rows["report"].state == "waiting"
    assert process.run("controller", lambda: C.main(ctl.cfg, cluster)) == EXIT_BAD_INPUT  # as jobs/controller.py
    # The controller Job itself ends now, with the reason, rather than being retried by a 1.20 server.
    assert "no such folder" in cluster.jobs["r1-controller"]["metadata"]["annotations"][jobspec.ANN_FAILURE]
    rows = {r.node: r for r in table.collect(cluster, "r1")}
    assert rows["controller"].state == "failed" and "textures-mini/prep" in rows["controller"].reason


def test_a_retryable_failure_is_not_final(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    ctl.step()
    prep = cluster.stage_jobs()["textures-mini/prep"]
    cluster.finish(prep, exit_code=137)
    result = ctl.step()
    assert not result.failed
    assert "retrying" in result.states["textures-mini/prep"].reason
    cluster.jobs[prep]["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                   "message": "Job has reached the specified backoff limit"}]
    assert "backoff limit" in ctl.step().failed["textures-mini/prep"].reason


def test_multi_node_finetune_gets_one_job_per_rank(tmp_path):
    ctl, cluster = make_controller(tmp_path, finetune_nodes=2, finetune_service="r1-mysproj-ft")
    for node in ("textures-mini/prep", "models/tiny", "models/clip-tiny"):
        complete_output(ctl, node)
    ctl.step()
    ranks = [j for j in cluster.jobs.values() if j["metadata"]["labels"].get("mysproj.io/stage") == "finetune"]
    assert len(ranks) == 2
    envs = [{e["name"]: e["value"] for e in j["spec"]["template"]["spec"]["containers"][0]["env"]} for j in ranks]
    rank0 = next(j for j, e in zip(ranks, envs) if e["NODE_RANK"] == "0")
    assert {e["NODE_RANK"] for e in envs} == {"0", "1"} and all(e["NNODES"] == "2" for e in envs)
    assert all(e["MASTER_ADDR"] == f"{rank0['metadata']['name']}.r1-mysproj-ft" for e in envs)
    assert rank0["spec"]["template"]["spec"]["subdomain"] == "r1-mysproj-ft"
    assert rank0["spec"]["template"]["metadata"]["labels"]["mysproj.io/rank"] == "0"


def test_status_table_and_progress(tmp_path):
    ctl, cluster = make_controller(tmp_path)
    complete_output(ctl, "textures-mini/prep")
    complete_output(ctl, "models/tiny")
    ctl.step()
    ft_out = ctl.configs["textures-mini/ft-projector/seed0/finetune"].out
    write_text(join(ft_out, "metrics.jsonl"), '{"step": 1, "total": 2, "loss": 3.5}\n'
               '{"step": 2, "total": 2, "loss": 2.25, "samples_per_s": 4.0, "eta_s": 75}\n')
    rows = {r.node: r for r in table.collect(cluster, "r1")}
    assert rows["textures-mini/prep"].state == "reused"
    ft = rows["textures-mini/ft-projector/seed0/finetune"]
    assert ft.state == "running" and ft.progress == "step 2/2 loss 2.25 4 samples/s eta 1m15s"
    text = table.render(list(rows.values()))
    assert text.splitlines()[0].split() == ["STAGE", "JOB", "STATE", "START", "DURATION", "THROUGHPUT", "PROGRESS",
                                             "REASON"]
    assert watch.show(cluster, "r1", out=lambda s: None) == 0


def test_controller_and_status_never_import_torch():
    code = ("import sys; import mysproj.kube.controller, mysproj.kube.watch, mysproj.kube.logs; "
            "import mysproj.commands.status; "
            "bad = [m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("stage", ["prep", "model-init", "finetune", "merge", "eval-clip", "eval-llava", "probe",
                                   "report"])
def test_every_stage_has_an_entry_point(stage):
    from pathlib import Path

    from mysproj.stages import registry

    script, name = jobspec.entry_args(stage)
    assert (Path(__file__).resolve().parents[1] / script).exists(), script
    assert name in registry.STAGES
