"""TEST INFRASTRUCTURE: a node stand-in for the local Kubernetes control plane (like SIG kwok, but it runs the pods).

No kubelet can run on the test machines (no container runtime), so this process plays the node against the *real*
v1.20.2 API server, scheduler and Job controller (k8s/controlplane/cluster.py):

- registers Ready Node(s) with `nvidia.com/gpu` capacity and GPU labels (`nvidia.com/gpu.product`, ...), and
  heartbeats node status + the Lease in `kube-node-lease` every 10 s;
- watches pods bound to its nodes and runs each container's `command` + `args` as a **local process** with the pod's
  environment: `value`, `$(VAR)` expansion, `valueFrom` secretKeyRef / configMapKeyRef / fieldRef / resourceFieldRef
  and `envFrom` are resolved through the API (a missing Secret keeps the pod Waiting in CreateContainerConfigError);
- cwd is the repo root (the images' WORKDIR holds the same `jobs/` and package); `python`, `mysproj`, `torchrun`
  resolve to the venv's binaries (`--path-prepend`), so image commands run unchanged;
- volumes: emptyDir and PVCs become local directories (per pod / per claim), configMap and secret volumes are written
  out as files, hostPath is used as is; a mount path appearing at the start of an env value, a command/args token or
  after `=` in a token is rewritten to the local directory. Code that opens a mount path it got from nowhere else
  (hard-coded) is not redirected;
- `HOME` and `TMPDIR` are per-pod temporary directories unless the pod points them into one of its volumes;
  `HOSTNAME` is the pod name; the pod's ServiceAccount gets a bound token (TokenRequest) written into a kubeconfig
  exported as `KUBECONFIG` (in-cluster files under /var/run/secrets are not emulated: use `config.load_config()`
  or fall back to the kubeconfig), with `KUBERNETES_SERVICE_HOST/PORT` pointing at the API server;
- reports Running, then Succeeded/Failed with `containerStatuses[].state.terminated` (exitCode, 128+signal when
  killed, reason Completed/Error, message = last lines of the output) through `pods/status`; restartPolicy
  OnFailure/Always restart the process in place (restartCount);
- deleting a pod kills its process group (SIGTERM, SIGKILL after the grace period, at most --max-grace s) and then
  finalizes the deletion, as a kubelet does;
- each container's output goes to `<state>/pods/<ns>/<pod>/<container>.log` and, while it runs, its PID to
  `<container>.pid` (see `kill_container` for fault tests); with --tls-cert/--tls-key it also serves
  `/containerLogs/...` so `kubectl logs` and `read_namespaced_pod_log` work through the API server.

- every pod is 127.0.0.1: a Service DNS name (`<name>.<ns>.svc[.cluster.local]`) in an env value or command/args
  token is rewritten to 127.0.0.1 (enough for a rank-0 headless Service; bare Service names are not).

Container mode (--containers, what the Kubernetes test tier uses): each container runs with podman from the pod's
image instead, with its securityContext, volumes as bind mounts at their mount paths, resource limits, and the image's
own ENV, entrypoint and working directory; every pod shares one network namespace that holds only `lo`, where the API
server's port and each --forward-port (the object store) are forwarded from the host: pods reach those and each other
on 127.0.0.1, and nothing else. A missing image keeps the pod Waiting (ErrImageNeverPull, or ErrImagePull <->
ImagePullBackOff) as a kubelet does. Needs root, podman, runc and iproute2 (images/install-tools.sh). The mapping:
pod_containers.py.

Not emulated: pulls (images must be in the local container storage), probes, pod networking beyond the shared
loopback and DNS resolution, the pod's own activeDeadlineSeconds, lifecycle hooks, ephemeral containers, GPU devices
(capacity only); in process mode also images, resource limits and securityContext (accepted, ignored). This file is
the node (registration, heartbeats, watch, log endpoint); pod_runner.py runs pods, pod_config.py resolves their
environment, volumes and command lines, pod_containers.py runs podman and the pods' network namespace.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from pod_containers import Podman, PodNetwork
from pod_runner import MERGE, PodRunner, log, now, pod_dir

HEARTBEAT_S = 10


@dataclass
class NodeSpec:
    name: str
    gpus: int = 8
    gpu_product: str = "NVIDIA-A100-SXM4-80GB"
    cpu: str = "16"
    memory: str = "128Gi"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)


class Agent:
    def __init__(self, kubeconfig: str, nodes: list[NodeSpec], state: Path, *, path_prepend: list[str],
                 base_env: dict[str, str], max_grace: float = 5, tls: tuple[str, str] | None = None,
                 network: PodNetwork | None = None):
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = 64  # one connection per pod thread, watch and heartbeat
        self.api_client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api_client)
        self.coord = client.CoordinationV1Api(self.api_client)
        self.server, self.ca_file = cfg.host, cfg.ssl_ca_cert
        self.nodes = {n.name: n for n in nodes}
        self.state = Path(state).resolve()
        self.path_prepend, self.base_env, self.max_grace, self.tls = path_prepend, base_env, max_grace, tls
        self.runners: dict[str, PodRunner] = {}
        self.network = network  # container mode: the pods' namespace; None = pods run as local processes
        self.podman = Podman(network, f"io.mysproj.node-agent={self.state}") if network else None
        self.stopping = threading.Event()
        self.log_port = 0

    # -- node ------------------------------------------------------------------------------------------------------
    def node_status(self, spec: NodeSpec) -> dict:
        capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "100Gi",
                    "nvidia.com/gpu": str(spec.gpus)}
        ok = {"status": "False", "lastHeartbeatTime": now()}
        return {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "node stand-in is ready",
                 "lastHeartbeatTime": now()},
                {"type": "MemoryPressure", "reason": "KubeletHasSufficientMemory", **ok},
                {"type": "DiskPressure", "reason": "KubeletHasNoDiskPressure", **ok},
                {"type": "PIDPressure", "reason": "KubeletHasSufficientPID", **ok},
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "mysproj node stand-in (tests/infra/node_agent.py)",
                         "containerRuntimeVersion": "local-process://1", "kubeletVersion": "v1.20.2",
                         "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"},
        }

    def register(self) -> None:
        for spec in self.nodes.values():
            labels = {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                      "type": "mysproj-node-agent"}
            if spec.gpus:
                labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": spec.gpu_product,
                               "nvidia.com/gpu.count": str(spec.gpus)})
            labels.update(spec.labels)
            body = {"metadata": {"name": spec.name, "labels": labels}, "spec": {"taints": spec.taints or None}}
            try:
                self.core.create_node(body)
            except ApiException as e:
                if e.status != 409:
                    raise
                self.core.patch_node(spec.name, body, _content_type=MERGE)
            self.core.patch_node_status(spec.name, {"status": self.node_status(spec)}, _content_type=MERGE)
            log(f"registered node {spec.name} ({spec.gpus} x nvidia.com/gpu)")

    def heartbeat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            for spec in self.nodes.values():
                try:
                    self.core.patch_node_status(spec.name, {"status": self.node_status(spec)}, _content_type=MERGE)
                    self.renew_lease(spec.name)
                except Exception as e:  # keep beating: a transient API error must not kill the node
                    log(f"heartbeat of {spec.name} failed: {e}")

    def renew_lease(self, name: str) -> None:
        ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": ts}}
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", body, _content_type=MERGE)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    # -- pods ------------------------------------------------------------------------------------------------------
    def reconcile(self, pod: client.V1Pod, deleted: bool = False) -> None:
        if pod.spec.node_name not in self.nodes:
            return
        uid = pod.metadata.uid
        runner = self.runners.get(uid)
        if deleted:
            if runner:
                runner.stop(finalize=False)
                self.runners.pop(uid, None)
            return
        if pod.metadata.deletion_timestamp is not None:
            if runner:
                runner.stop(finalize=True)
            else:
                self.finalize_delete(pod)
        elif runner is None and pod.status.phase not in ("Succeeded", "Failed"):
            runner = self.runners[uid] = PodRunner(self, pod)
            runner.start()

    def finalize_delete(self, pod: client.V1Pod) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                                            body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                        preconditions={"uid": pod.metadata.uid}))
        except ApiException as e:
            if e.status not in (404, 409):
                log(f"finalizing deletion of {pod.metadata.namespace}/{pod.metadata.name} failed: {e.reason}")
        shutil.rmtree(pod_dir(self.state, pod.metadata.namespace, pod.metadata.name) / f"run-{pod.metadata.uid[:8]}",
                      ignore_errors=True)

    def watch_pods(self) -> None:
        """List + watch, relisting every 30 s or after any error: level-triggered, so a missed event heals."""
        while not self.stopping.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces()
                seen = set()
                for pod in listed.items:
                    seen.add(pod.metadata.uid)
                    self.reconcile(pod)
                for uid in [u for u in self.runners if u not in seen]:
                    self.runners.pop(uid).stop(finalize=False)
                w = watch.Watch()
                rv = listed.metadata.resource_version
                for ev in w.stream(self.core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=30):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    self.reconcile(ev["object"], deleted=ev["type"] == "DELETED")
            except Exception as e:
                if not self.stopping.is_set():
                    log(f"pod watch restarts after: {e}")
                    time.sleep(1)

    def serve_logs(self) -> None:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # /containerLogs/<ns>/<pod>/<container>?tailLines=&follow=&limitBytes=
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                q = dict(urllib.parse.parse_qsl(url.query))
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                path = pod_dir(agent.state, parts[1], parts[2]) / f"{parts[3]}.log"
                if not path.exists():
                    self.send_error(404, f"no log for container {parts[3]}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in q:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(q["tailLines"]):]) if int(q["tailLines"]) else b""
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"])]
                self.wfile.write(data)
                if q.get("follow") == "true":  # stream new output until the process is gone
                    with path.open("rb") as f:
                        f.seek(path.stat().st_size)
                        while (path.with_suffix(".pid")).exists():
                            chunk = f.read()
                            if chunk:
                                self.wfile.write(chunk)
                                self.wfile.flush()
                            time.sleep(0.5)
                        self.wfile.write(f.read())

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.log_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True, name="logs").start()

    def run(self) -> None:
        if self.network:
            self.podman.remove_all()  # leftovers of an agent that was killed
            self.network.create()
            log(f"container mode: pods share network namespace {self.network.name}, ports "
                f"{', '.join(map(str, self.network.ports))} forwarded")
        if self.tls:
            self.serve_logs()
        self.register()
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        watcher = threading.Thread(target=self.watch_pods, daemon=True, name="watch")
        watcher.start()
        (self.state / "agent.ready").write_text(str(os.getpid()))
        self.stopping.wait()
        log("stopping: killing pod processes")
        for runner in list(self.runners.values()):
            runner.stop(finalize=False)
        for runner in list(self.runners.values()):
            runner.join(self.max_grace + 2)
        if self.network:
            self.podman.remove_all()
            self.network.remove()


def api_port(kubeconfig: str) -> int:
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return urllib.parse.urlparse(cfg.host).port or 443


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True, type=Path, help="pod logs, PID files and scratch directories")
    p.add_argument("--node", action="append", default=None, help="node name (repeat for several); default gpu-node-0")
    p.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity of each node")
    p.add_argument("--gpu-product", default="NVIDIA-A100-SXM4-80GB")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT")
    p.add_argument("--path-prepend", action="append", default=[], help="dirs searched first for pod commands")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="base environment of every pod (what the image's ENV would set)")
    p.add_argument("--max-grace", type=float, default=5, help="cap on terminationGracePeriodSeconds")
    p.add_argument("--containers", action="store_true", help="run each container with podman from its image")
    p.add_argument("--netns", default=f"mysproj-pods-{os.getpid()}", help="container mode: the pods' namespace")
    p.add_argument("--forward-port", action="append", type=int, default=[], metavar="PORT",
                   help="container mode: a host 127.0.0.1 port pods reach at 127.0.0.1 (the API server's is added)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    a = p.parse_args(argv)
    labels = dict(kv.split("=", 1) for kv in a.label)
    taints = []
    for t in a.taint:
        kv, _, effect = t.rpartition(":")
        key, _, value = kv.partition("=")
        taints.append({"key": key, "value": value or None, "effect": effect})
    nodes = [NodeSpec(n, a.gpus, a.gpu_product, labels=labels, taints=taints) for n in (a.node or ["gpu-node-0"])]
    a.state_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(kv.split("=", 1) for kv in a.env)
    prepend = [str(Path(d).resolve()) for d in a.path_prepend] or [str(Path(sys.executable).parent)]
    tls = (a.tls_cert, a.tls_key) if a.tls_cert else None
    network = None
    if a.containers:
        network = PodNetwork(a.netns, sorted({api_port(a.kubeconfig), *a.forward_port}))
    Agent(a.kubeconfig, nodes, a.state_dir, path_prepend=prepend, base_env=base_env, max_grace=a.max_grace,
          tls=tls, network=network).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
