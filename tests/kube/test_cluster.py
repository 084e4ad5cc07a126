"""The test cluster itself: real Job controller, scheduler, RBAC and Secrets, with every pod run by a real kubelet
and containerd in the project's CPU image, under its securityContext, on the pod network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.kube

HARDENED = {"runAsNonRoot": True, "runAsUser": 1000, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def job(kube, name: str, script: str, *, env=None, backoff: int = 0, service_account: str | None = None,
        gpu: bool = False, volumes: tuple = (), host_paths: dict | None = None) -> dict:
    mounts = {**{v: f"/{v}" for v in volumes}, **{v: f"/{v}" for v in host_paths or {}}}
    container = {"name": "main", "image": kube.images["cpu"], "imagePullPolicy": "Never",
                 "command": ["python", "-c", textwrap.dedent(script)], "env": env or [], "securityContext": HARDENED,
                 "terminationMessagePolicy": "FallbackToLogsOnError",  # as the chart's: the output's end
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
                 "volumeMounts": [{"name": v, "mountPath": path} for v, path in mounts.items()]}
    pod = {"restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 2,
           "volumes": [{"name": v, "emptyDir": {}} for v in volumes]
           + [{"name": v, "hostPath": {"path": str(path)}} for v, path in (host_paths or {}).items()]}
    if service_account:
        pod["serviceAccountName"] = service_account
    if gpu:
        container["resources"]["limits"]["nvidia.com/gpu"] = "1"
        pod["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"metadata": {"labels": {"test": name}}, "spec": pod}}}


def finished(kube, name: str):
    """The Job once the real Job controller marks it Complete or Failed."""
    j = kube.batch.read_namespaced_job_status(name, kube.namespace)
    return j if any(c.type in ("Complete", "Failed") and c.status == "True" for c in j.status.conditions or []) \
        else None


def only_pod(kube, name: str):
    pods = kube.pods(f"job-name={name}")
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def explain(kube, name: str) -> str:
    """The Job's pods with their states and output, for assertion messages."""
    return "\n".join(f"{p.metadata.name} {p.status.phase} {p.status.container_statuses}\n"
                     f"{kube.pod_log(p.metadata.name)}" for p in kube.pods(f"job-name={name}"))


def test_job_pod_runs_through_scheduler_and_node(kube):
    script = """
        import os, pathlib
        scratch = pathlib.Path(os.environ["SCRATCH"])
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "out.txt").write_text("written")
        print("pod", os.environ["POD_NAME"], "in", os.environ["POD_NAMESPACE"], "scratch", scratch)
        print("read back", (scratch / "out.txt").read_text())
        print("home", os.environ["HOME"], "user", os.getuid(), os.getgid(), "cwd", os.getcwd())
    """
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "SCRATCH", "value": "/scratch/work"}]
    kube.batch.create_namespaced_job(kube.namespace, job(kube, "hello", script, env=env, gpu=True,
                                                         volumes=("scratch",)))
    j = kube.wait_for(lambda: finished(kube, "hello"), 60, "job hello to finish")
    assert j.status.succeeded == 1 and not j.status.failed, explain(kube, "hello")
    pod = only_pod(kube, "hello")
    assert pod.spec.node_name == kube.node  # bound by the real scheduler to the GPU node
    assert pod.status.phase == "Succeeded"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    out = kube.pod_log(pod.metadata.name)
    assert f"pod {pod.metadata.name} in {kube.namespace} scratch /scratch/work" in out
    # The image's own ENV, WORKDIR and the securityContext's user; the emptyDir is writable.
    assert "home /scratch/home user 1000 0 cwd /app" in out and "read back written" in out, out
    # The API server proxies pod logs from the kubelet, so `kubectl logs` shows the same.
    logs = subprocess.run(["kubectl", "logs", pod.metadata.name, "--namespace", kube.namespace], env=kube.env,
                          capture_output=True, text=True)
    assert logs.returncode == 0 and logs.stdout == out, logs.stderr


def test_failing_command_fails_job_with_exit_code(kube):
    script = "import sys\nprint('error: bad input x')\nsys.exit(64)"
    kube.batch.create_namespaced_job(kube.namespace, job(kube, "bad", script))
    j = kube.wait_for(lambda: finished(kube, "bad"), 60, "job bad to finish")
    assert j.status.failed == 1 and not j.status.succeeded
    assert [c.reason for c in j.status.conditions if c.type == "Failed"] == ["BackoffLimitExceeded"]
    pod = only_pod(kube, "bad")
    term = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed"
    assert (term.exit_code, term.reason) == (64, "Error")
    assert "error: bad input x" in term.message


def test_secret_env_reaches_process(kube):
    value = "s3cr3t-" + os.urandom(4).hex()
    env = [{"name": "ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}}]
    script = "import hashlib, os\nprint(hashlib.sha256(os.environ['ACCESS_KEY'].encode()).hexdigest())"
    kube.batch.create_namespaced_job(kube.namespace, job(kube, "secret", script, env=env))

    def waiting_for_secret():  # as with a kubelet, the pod waits for a missing Secret instead of running without it
        pods = kube.pods("job-name=secret")
        states = [s.state.waiting for p in pods for s in p.status.container_statuses or []]
        return any(w and w.reason == "CreateContainerConfigError" and "creds" in w.message for w in states)

    kube.wait_for(waiting_for_secret, 60, "the pod to wait for Secret creds")
    kube.core.create_namespaced_secret(kube.namespace, {"metadata": {"name": "creds"}, "stringData": {"key": value}})
    assert kube.wait_for(lambda: finished(kube, "secret"), 60, "job secret").status.succeeded == 1, \
        explain(kube, "secret")
    assert hashlib.sha256(value.encode()).hexdigest() in kube.pod_log(only_pod(kube, "secret").metadata.name)


def test_rbac_is_enforced_for_pod_service_accounts(kube):
    ns = kube.namespace
    for sa in ("nobody", "reader"):
        kube.core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    kube.rbac.create_namespaced_role(ns, {"metadata": {"name": "job-reader"}, "rules": [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]}]})
    kube.rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "reader-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "job-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]})
    script = """
        import os, sys
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
        config.load_config()  # in-cluster: the pod's ServiceAccount token, the `kubernetes` Service
        try:
            client.BatchV1Api().list_namespaced_job(os.environ["POD_NAMESPACE"])
        except ApiException as e:
            print("status", e.status)
            sys.exit(3)
        print("status 200")
    """
    env = [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    for sa in ("nobody", "reader"):
        kube.batch.create_namespaced_job(ns, job(kube, f"as-{sa}", script, env=env, service_account=sa))
    denied = kube.wait_for(lambda: finished(kube, "as-nobody"), 60, "job as-nobody")
    allowed = kube.wait_for(lambda: finished(kube, "as-reader"), 60, "job as-reader")
    assert denied.status.failed == 1 and allowed.status.succeeded == 1, explain(kube, "as-nobody") + \
        explain(kube, "as-reader")
    assert "status 403" in kube.pod_log(only_pod(kube, "as-nobody").metadata.name)
    assert "status 200" in kube.pod_log(only_pod(kube, "as-reader").metadata.name)
    token = kube.core.create_namespaced_service_account_token("nobody", ns, {"spec": {"audiences": []}})
    with pytest.raises(ApiException) as err:  # and the rights-less account is refused from outside too
        cfg = client.Configuration()
        cfg.host, cfg.ssl_ca_cert = kube.server, str(kube.controlplane_dir / "pki" / "ca.crt")
        cfg.api_key = {"authorization": "Bearer " + token.status.token}
        client.BatchV1Api(client.ApiClient(cfg)).list_namespaced_job(ns)
    assert err.value.status == 403


def test_killed_process_is_retried_and_deleted_pod_is_stopped(kube, tmp_path):
    tmp_path.chmod(0o777)  # a hostPath the container's user (1000) writes to
    script = """
        import pathlib, time
        marker = pathlib.Path("/state/first-attempt")
        if not marker.exists():
            marker.write_text("started")
            print("first attempt waits to be killed", flush=True)
            time.sleep(120)
        print("second attempt done")
    """
    kube.batch.create_namespaced_job(kube.namespace, job(kube, "flaky", script, backoff=2,
                                                         host_paths={"state": tmp_path}))
    first = kube.wait_for(lambda: [p for p in kube.pods("job-name=flaky") if kube.is_running(p.metadata.name)
                              and "waits" in kube.pod_log(p.metadata.name)], 60, "first attempt running")[0]
    kube.kill(first.metadata.name)
    j = kube.wait_for(lambda: finished(kube, "flaky"), 90, "job flaky to finish after the kill")
    assert (j.status.succeeded, j.status.failed) == (1, 1), explain(kube, "flaky")
    killed = kube.core.read_namespaced_pod(first.metadata.name, kube.namespace)
    assert killed.status.container_statuses[0].state.terminated.exit_code == 137  # 128 + SIGKILL

    # Deleting a running pod kills its process and the deletion completes (the kubelet finalizes it).
    kube.core.create_namespaced_pod(kube.namespace, {"metadata": {"name": "sleeper"}, "spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": kube.images["cpu"], "imagePullPolicy": "Never",
                        "command": ["python", "-c", "import time; time.sleep(300)"]}]}})
    kube.wait_for(lambda: kube.is_running("sleeper"), 60, "sleeper running")
    pid = kube.container_pid("sleeper")
    kube.core.delete_namespaced_pod("sleeper", kube.namespace)

    def gone():
        try:
            kube.core.read_namespaced_pod("sleeper", kube.namespace)
            return False
        except ApiException as e:
            return e.status == 404

    kube.wait_for(gone, 30, "pod sleeper deleted")
    kube.wait_for(lambda: not _alive(pid), 10, f"process {pid} to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pod_features_the_chart_uses(kube):
    """configMap volume, envFrom with prefix, $(VAR) in args, emptyDir surviving an OnFailure restart."""
    ns = kube.namespace
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "tpl"},
                                                "data": {"stage.yaml": "kind: Job\n", "MODE": "fast"}})
    script = """
        import os, pathlib, sys
        marker = pathlib.Path(os.environ["STATE"]) / "tried"
        print("args", sys.argv[1:], "template", open(sys.argv[2]).read().strip(), flush=True)
        if not marker.exists():
            marker.write_text("1")
            sys.exit(5)
    """
    kube.core.create_namespaced_pod(ns, {"metadata": {"name": "features"}, "spec": {
        "restartPolicy": "OnFailure", "volumes": [{"name": "tpl", "configMap": {"name": "tpl"}},
                                                  {"name": "state", "emptyDir": {}}],
        "containers": [{"name": "main", "image": kube.images["cpu"],
                        "command": ["python", "-c", textwrap.dedent(script)],
                        "args": ["$(CFG_MODE)", "/etc/tpl/stage.yaml"],
                        "envFrom": [{"configMapRef": {"name": "tpl"}, "prefix": "CFG_"}],
                        "env": [{"name": "STATE", "value": "/state"}],
                        "volumeMounts": [{"name": "tpl", "mountPath": "/etc/tpl", "readOnly": True},
                                         {"name": "state", "mountPath": "/state"}]}]}})

    def done():
        pod = kube.core.read_namespaced_pod("features", ns)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    pod = kube.wait_for(done, 120, "pod features to finish")
    status = pod.status.container_statuses[0]
    assert pod.status.phase == "Succeeded", kube.pod_log("features")
    assert status.restart_count == 1 and status.last_state.terminated.exit_code == 5
    out = kube.pod_log("features")
    assert out.count("args ['fast', '") == 2 and "template kind: Job" in out


def test_container_runs_under_its_security_context_and_limits(kube):
    """The chart's hardening, enforced: user and fsGroup, read-only root (no tmpfs either), no capabilities, no
    privilege escalation, the memory limit; the emptyDir is writable by the pod's user."""
    script = """
        import os, pathlib
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        print("ids", os.getuid(), os.getgid(), 2000 in os.getgroups())
        print("caps", status["CapEff"].strip(), "nnp", status["NoNewPrivs"].strip())
        print("limit", open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip())
        for path in ("/app/x", "/tmp/x", "/work/x"):
            try:
                pathlib.Path(path).write_text("x")
                print("wrote", path)
            except OSError as e:
                print("refused", path, e.strerror)
    """
    body = job(kube, "hardened", script, volumes=("work",))
    body["spec"]["template"]["spec"]["securityContext"] = {"fsGroup": 2000}
    kube.batch.create_namespaced_job(kube.namespace, body)
    j = kube.wait_for(lambda: finished(kube, "hardened"), 60, "job hardened to finish")
    assert j.status.succeeded == 1, explain(kube, "hardened")
    out = kube.pod_log(only_pod(kube, "hardened").metadata.name)
    assert "ids 1000 0 True" in out and "caps 0000000000000000 nnp 1" in out, out
    assert f"limit {1024 ** 3}" in out, out
    assert "refused /app/x Read-only file system" in out and "refused /tmp/x Read-only file system" in out, out
    assert "wrote /work/x" in out, out


def test_pods_reach_the_api_server_and_the_object_store_over_the_pod_network(kube):
    """Each pod has its own network namespace on the node's bridge: it reaches the API server at the `kubernetes`
    Service's address (what in-cluster clients use; the bridge's gateway carries it, there is no kube-proxy) and
    the S3 server at the endpoint the chart is given; the host's 127.0.0.1 is not the pod's. The gateway's MAC
    address, as the pod learnt it, is the bridge's own fixed one: one derived from its ports changes as pods come
    and go, and pods that cached it lose their connections for minutes."""
    import socket

    with socket.socket() as host_only:
        host_only.bind(("127.0.0.1", 0))
        host_only.listen(1)
        script = f"""
            import os, socket, urllib.parse
            print("interfaces", sorted(name for _, name in socket.if_nameindex()))
            s3 = urllib.parse.urlsplit("{kube.s3_endpoint}")
            targets = {{"api": (os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])),
                        "s3": (s3.hostname, s3.port), "host-only": ("127.0.0.1", {host_only.getsockname()[1]})}}
            for what, address in targets.items():
                try:
                    socket.create_connection(address, timeout=5).close()
                    print(what, "reached")
                except OSError as e:
                    print(what, "refused", e.errno)
            with open("/proc/net/arp") as arp:
                print("arp", [line.split()[:4:3] for line in arp.read().splitlines()[1:]])
        """
        kube.batch.create_namespaced_job(kube.namespace, job(kube, "netcheck", script))
        j = kube.wait_for(lambda: finished(kube, "netcheck"), 60, "job netcheck to finish")
    assert j.status.succeeded == 1, explain(kube, "netcheck")
    out = kube.pod_log(only_pod(kube, "netcheck").metadata.name)
    assert "interfaces ['eth0', 'lo']" in out and "api reached" in out and "s3 reached" in out, out
    assert "host-only refused 111" in out, out  # ECONNREFUSED: the pod's own loopback has nothing there
    network = kube.runtime.network
    assert f"['{network.gateway}', '{network.mac}']" in out, out
    # NET_ADDR_SET: the kernel keeps an address it was given whatever ports join or leave the bridge
    assert Path(f"/sys/class/net/{network.bridge}/addr_assign_type").read_text().strip() == "3"


def _waiting_reasons(kube, pod: str) -> list[str]:
    p = kube.core.read_namespaced_pod(pod, kube.namespace)
    return [f"{s.state.waiting.reason}: {s.state.waiting.message}" for s in p.status.container_statuses or []
            if s.state.waiting]


def test_missing_image_and_root_user_keep_the_pod_waiting_as_a_kubelet_does(kube):
    """No pull ever happens: a missing image is ErrImageNeverPull (policy Never) or ErrImagePull alternating with
    ImagePullBackOff; runAsNonRoot with user 0 is CreateContainerConfigError. Each stays Waiting, retried."""
    def pod(name, image, policy, user=1000):
        kube.core.create_namespaced_pod(kube.namespace, {"metadata": {"name": name}, "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": image, "imagePullPolicy": policy, "command": ["python", "-c", "pass"],
                "securityContext": {**HARDENED, "runAsUser": user}}]}})

    pod("never", "localhost/mysproj-no-such-image:0", "Never")
    pod("ifnotpresent", "localhost/mysproj-no-such-image:0", "IfNotPresent")
    pod("rootuser", kube.images["cpu"], "Never", user=0)
    seen: set[str] = set()

    def all_seen():
        for name in ("never", "ifnotpresent", "rootuser"):
            seen.update(f"{name} {r.split(':')[0]}" for r in _waiting_reasons(kube, name))
        return {"never ErrImageNeverPull", "ifnotpresent ErrImagePull", "ifnotpresent ImagePullBackOff",
                "rootuser CreateContainerConfigError"} <= seen

    kube.wait_for(all_seen, 60, "the waiting reasons", interval=0.5)
    assert any("not present with pull policy of Never" in r for r in _waiting_reasons(kube, "never"))
    assert any("runAsUser breaks non-root policy" in r for r in _waiting_reasons(kube, "rootuser"))
    for name in ("never", "ifnotpresent", "rootuser"):
        assert kube.core.read_namespaced_pod(name, kube.namespace).status.phase == "Pending"
        kube.core.delete_namespaced_pod(name, kube.namespace, grace_period_seconds=0)


def test_the_controller_events_are_accepted_and_listed_by_the_api_server(kube, monkeypatch):
    """The Event body mysproj.kube.events writes is valid for a real API server, lands on the Job
    (`kubectl get events --field-selector involvedObject.name=...`) and is written once per story line."""
    from mysproj.kube.cluster import Cluster
    from mysproj.kube.events import EventRecorder

    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    kube.batch.create_namespaced_job(kube.namespace, job(kube, "story", "print('ok')"))
    cluster = Cluster(namespace=kube.namespace)
    recorder = EventRecorder(cluster, cluster.read_job("story"), "r1")
    recorder.record("started/a", "StageStarted", "stage a started: Job a-1")
    recorder.record("failed/a", "StageFailed", "stage a failed: bad input (exit 64): no such folder", warning=True)
    again = EventRecorder(cluster, cluster.read_job("story"), "r1")  # a restarted controller: 409, no error
    again.record("started/a", "StageStarted", "stage a started: Job a-1")
    assert not again.warned and not recorder.warned
    from mysproj.kube.events import SOURCE

    # the Job controller's own (SuccessfulCreate) are there too; one second apart at most: keyed by reason
    events = {e["reason"]: e for e in cluster.list_events("story")
              if (e.get("source") or {}).get("component") == SOURCE}
    assert {r: e["type"] for r, e in events.items()} == {"StageStarted": "Normal", "StageFailed": "Warning"}
    assert events["StageFailed"]["involvedObject"]["kind"] == "Job"
    assert events["StageFailed"]["message"].endswith("no such folder")
