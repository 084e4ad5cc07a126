"""MLflow against a real tracking server on loopback: a pipeline run gives one parent run with a child per stage
output (params, metrics per step, tags) and the report as the parent's artifacts; a server killed mid-run or down
from the start costs one warning and nothing else, and the manifest says what was missed."""

from __future__ import annotations

import logging

import pytest
from loopback_ports import free_ports
from mlflow_server import MlflowServer, mlflow_binary

pytest.importorskip("mlflow")


def _server(tmp_path_factory, name):
    binary = mlflow_binary()
    if not binary:
        pytest.skip("no `mlflow` server binary (make mlflow-server); the MLflow tests need a real server")
    server = MlflowServer(binary, str(tmp_path_factory.mktemp(name)), free_ports(1)[0])
    server.start()
    return server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = _server(tmp_path_factory, "mlflow")
    yield server
    server.stop()


def _client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def _runs(client, experiment, filters=""):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=filters) if exp else []


def test_a_pipeline_run_is_one_parent_with_a_child_per_stage_output(mlflow_server, tmp_path):
    pytest.importorskip("torch")
    from mysproj.config.fields import load_config
    from mysproj.pipeline import local
    from mysproj.pipeline.dag import PipelineConfig

    root = str(tmp_path / "run")
    cfg = load_config(PipelineConfig, env={}, overrides={
        "root": root, "strategies": ["projector"], "zero_shot": False, "probe": False,
        "tracking": {"mlflow_uri": mlflow_server.uri, "mlflow_experiment": "pipeline"},
        "overrides": {"finetune": {"max_steps": 3, "global_batch": 4, "workers": 0, "log_every": 2},
                      "eval-llava": {"limit": 4, "max_new_tokens": 4, "workers": 0, "batch_size": 4},
                      "prep": {"max_per_class": 4, "workers": 1}}})
    outcome = local.run(cfg)
    assert local.exit_code(outcome) == 0
    client = _client(mlflow_server)
    parents = _runs(client, "pipeline", "tags.`mysproj.kind` = 'parent'")
    assert len(parents) == 1 and parents[0].data.tags["mysproj.root"] == root
    assert parents[0].data.tags["mysproj.recipe"] == "paper"
    parent = parents[0].info.run_id
    children = {r.data.tags["mysproj.run_path"]: r for r in
                _runs(client, "pipeline", f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert set(children) == {"textures-mini/ft-projector/seed0/finetune", "textures-mini/ft-projector/seed0/eval-llava"}
    ft = children["textures-mini/ft-projector/seed0/finetune"]
    assert ft.data.params["strategy"] == "projector" and ft.data.params["max_steps"] == "3"
    assert ft.data.tags["mysproj.config_hash"] and ft.info.status == "FINISHED"
    loss = client.get_metric_history(ft.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2, 3]  # every optimizer step
    ev = children["textures-mini/ft-projector/seed0/eval-llava"]
    assert "eval/macro_f1" in ev.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/results.parquet", "report/plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent, "report/plots")}
    assert "report/plots/loss_textures-mini.png" in plots


def test_a_server_killed_mid_run_costs_one_warning(tmp_path_factory, tiny_model, prep, tmp_path, monkeypatch,
                                                   caplog):
    pytest.importorskip("torch")
    from stage_runs import finetune

    from mysproj.training import checkpoint

    server = _server(tmp_path_factory, "mlflow-killed")
    real_save = checkpoint.save

    def save_then_kill_server(ctx, step, *rest):
        real_save(ctx, step, *rest)
        if step == 2:
            server.stop()

    monkeypatch.setattr(checkpoint, "save", save_then_kill_server)
    out = str(tmp_path / "ft")
    try:
        with caplog.at_level(logging.WARNING, logger="mysproj.tracking.mlflow_log"):
            m = finetune(tiny_model, prep, out, strategy="projector", checkpoint_every=2,
                         mlflow_uri=server.uri, mlflow_experiment="killed")
    finally:
        server.stop()
    warnings = [r for r in caplog.records if r.name == "mysproj.tracking.mlflow_log"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert m["summary"]["steps"] == 3 and m["summary"]["final_loss"] is not None  # the run went on to its end
    record = m["summary"]["mlflow"]  # what was missed, in the manifest
    assert record["run_id"] and record["missed"] >= 2 and record["error"].startswith("metrics: ")


def test_a_server_down_from_the_start_costs_one_warning(tmp_path, caplog):
    from mysproj.config.stages import EvalLlavaConfig
    from mysproj.tracking.mlflow_log import stage_run

    down = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    cfg = EvalLlavaConfig(model="m", data="d", out=str(tmp_path / "dtd/zero-shot/eval-llava"), mlflow_uri=down)
    with caplog.at_level(logging.WARNING, logger="mysproj.tracking.mlflow_log"):
        run = stage_run(cfg, "eval-llava")
        run.metrics(0, {"eval/macro_f1": 0.5})
        record = run.end()
    assert len([r for r in caplog.records if r.name == "mysproj.tracking.mlflow_log"]) == 1
    assert record["run_id"] is None and record["error"] and record["uri"] == down


def test_a_rerun_of_an_output_replaces_its_child(mlflow_server, tmp_path):
    """A stage run again at the same output with the same config (its input changed, or --force) leaves one
    child: the output holds only the last attempt's result."""
    from mysproj.config.stages import EvalLlavaConfig
    from mysproj.tracking.mlflow_log import stage_run

    cfg = EvalLlavaConfig(model="m", data="d", out=str(tmp_path / "run/dtd/zero-shot/eval-llava"),
                          mlflow_uri=mlflow_server.uri, mlflow_experiment="rerun")
    ids = []
    for f1 in (0.25, 0.5):
        run = stage_run(cfg, "eval-llava")
        run.metrics(0, {"eval/macro_f1": f1})
        ids.append(run.end()["run_id"])
    client = _client(mlflow_server)
    children = _runs(client, "rerun", f"tags.`mysproj.output` = '{cfg.out}'")
    assert [c.info.run_id for c in children] == [ids[1]] and children[0].data.metrics["eval/macro_f1"] == 0.5
    assert len(_runs(client, "rerun", "tags.`mysproj.kind` = 'parent'")) == 1


def test_a_server_that_refuses_gets_one_request_and_costs_one_warning(tmp_path, caplog):
    """A server that answers every request with 503 (an overloaded proxy in front of MLflow; MLflow's client would
    retry it with backoff for minutes): one request, no retry, nothing after it, one warning."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mysproj.config.stages import EvalLlavaConfig
    from mysproj.tracking.mlflow_log import stage_run

    seen = []

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self):
            seen.append(self.path)
            body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = EvalLlavaConfig(model="m", data="d", out=str(tmp_path / "dtd/zero-shot/eval-llava"), mlflow_uri=uri)
    try:
        with caplog.at_level(logging.WARNING, logger="mysproj.tracking.mlflow_log"):
            run = stage_run(cfg, "eval-llava")
            run.metrics(0, {"eval/macro_f1": 0.5})
            record = run.end()
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1, seen
    assert len([r for r in caplog.records if r.name == "mysproj.tracking.mlflow_log"]) == 1
    assert record["run_id"] is None and record["error"].startswith("experiment: ") and record["missed"] >= 1


def test_the_controller_tags_the_parent_a_stage_made_while_the_server_did_not_answer_it(mlflow_server, tmp_path,
                                                                                         monkeypatch, caplog):
    """The controller's first call failed (a server still starting, a timeout under load) and a stage that logged
    meanwhile made the parent without the release's tags: a later pass of the controller adds them."""
    from fake_cluster import FakeCluster, make_controller

    from mysproj.kube import controller as C
    from mysproj.tracking.mlflow_log import Tracker

    root = str(tmp_path / "run")
    real, calls = C.parent_run, []

    def first_call_unanswered(*args):
        calls.append(args)
        return "experiment: ConnectionError: timed out" if len(calls) == 1 else real(*args)

    monkeypatch.setattr(C, "parent_run", first_call_unanswered)
    monkeypatch.setattr(C, "PARENT_RETRY_SECONDS", 0)
    pipeline = {"root": root, "strategies": ["projector"], "overrides": {"finetune": {"max_steps": 2}},
                "tracking": {"mlflow_uri": mlflow_server.uri, "mlflow_experiment": "controller"}}
    with caplog.at_level(logging.WARNING):
        ctl, _ = make_controller(tmp_path, FakeCluster(pipeline))
    assert [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()] == [
        f"mlflow: {mlflow_server.uri} did not answer (experiment: ConnectionError: timed out); the run goes on, "
        f"trying again every 0 s"]
    made_by_stage = Tracker(mlflow_server.uri, "controller").parent(root)  # no tags: a stage knows no release
    ctl.step()
    ctl.step()
    assert len(calls) == 2  # tried again once, then done
    parents = _runs(_client(mlflow_server), "controller", "tags.`mysproj.kind` = 'parent'")
    assert [p.info.run_id for p in parents] == [made_by_stage]
    assert parents[0].data.tags["mysproj.release"] == "r1" and parents[0].data.tags["mysproj.recipe"]
