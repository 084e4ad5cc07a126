"""The `kube` fixture: a real Kubernetes v1.20.2 cluster on this machine, shared by the whole session: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, and a real kubelet with containerd as its node
(k8s/node/node.py), whose pods run in the project's images (`kube.images`: the CPU and GPU images of this work tree,
built by `make images-test` and linked into containerd). Pods sit on a private bridge: they reach the API server
through the `kubernetes` Service and the session's S3 server at `kube.s3_endpoint`, both on the bridge's gateway.
Each test module gets a fresh namespace. See k8s/README.md.

Either way the pods also reach the tests' own loopback servers, `pod_origin` (a dataset site) and `pod_mlflow` (an
MLflow tracking server), at `kube.origin_host`.

    def test_x(kube):
        kube.batch.create_namespaced_job(kube.namespace, body)   # image: kube.images["cpu"]
        subprocess.run(["helm", "install", ..., *kube.image_values], env=kube.env)  # KUBECONFIG, helm, the venv
        kube.pod_log(pod_name); kube.kill(pod_name)              # logs through the API; fault injection by PID
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools" / "bin"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


node_mod = _load("mysproj_test_node", REPO / "k8s" / "node" / "node.py")
Forwarder = _load("mysproj_test_forward", Path(__file__).parent / "forward.py").Forwarder
NODE = node_mod.NODE_NAME
GPU_PRODUCT = node_mod.Node.gpu_product


def wait_for(predicate, timeout: float = 60, what: str = "condition", interval: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned); fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclasses.dataclass
class Kube:
    """Handles on the test cluster. `namespace` is this module's fresh namespace."""

    kubeconfig: Path
    server: str
    env: dict[str, str]
    node_dir: Path            # the node's state: containerd, kubelet, their logs
    controlplane_dir: Path    # component logs, PKI, kubeconfig
    node: str
    api_client: object
    core: object              # kubernetes.client.CoreV1Api
    batch: object             # BatchV1Api
    rbac: object              # RbacAuthorizationV1Api
    images: dict[str, str]    # {"cpu": name, "gpu": name}, present in the node's containerd
    s3_endpoint: str          # the session's S3 server as pods reach it
    origin_host: str          # the host part of `pod_origin`'s URLs as pods reach them
    runtime: object           # k8s/node/node.py Node: container PIDs
    namespace: str = "default"
    gpu_product: str = GPU_PRODUCT  # the node's nvidia.com/gpu.product label
    wait_for = staticmethod(wait_for)

    @property
    def image_sets(self) -> list[str]:
        """Chart values (key=value) that point at the node's images (never pulled: no registry here)."""
        sets = []
        for kind, name in self.images.items():
            repository, tag = name.rsplit(":", 1)
            sets += [f"images.{kind}.repository={repository}", f"images.{kind}.tag={tag}",
                     f"images.{kind}.pullPolicy=Never"]
        return sets

    @property
    def image_values(self) -> list[str]:
        """`image_sets` as helm --set arguments."""
        return [a for s in self.image_sets for a in ("--set", s)]

    def new_namespace(self, prefix: str = "t") -> str:
        """Create a fresh namespace and wait for its `default` ServiceAccount and its token Secret (on 1.20, pod
        creation is refused until both exist)."""
        name = f"{prefix}-{next(_counter)}-{os.getpid() % 10000}"
        self.core.create_namespace({"metadata": {"name": name, "labels": {"mysproj.io/test": "true"}}})

        def default_sa_has_token():
            sas = self.core.list_namespaced_service_account(name, field_selector="metadata.name=default").items
            return sas and sas[0].secrets

        wait_for(default_sa_has_token, 30, f"the default ServiceAccount token of {name}")
        return name

    def _status(self, pod: str, container: str | None, namespace: str | None):
        from kubernetes.client.rest import ApiException

        try:
            p = self.core.read_namespaced_pod(pod, namespace or self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return next((s for s in p.status.container_statuses or [] if container in (None, s.name)), None)

    def pod_log(self, pod: str, container: str | None = None, namespace: str | None = None) -> str:
        """What the pod's container printed, through the API server and the kubelet (`kubectl logs`); after a
        restart in place, the previous run's output first."""
        from kubernetes.client.rest import ApiException

        status = self._status(pod, container, namespace)
        if status is None:
            return ""
        out = []
        for previous in ([True] if status.restart_count else []) + [False]:
            try:
                raw = self.core.read_namespaced_pod_log(pod, namespace or self.namespace, container=status.name,
                                                        previous=previous, _preload_content=False)
                out.append(raw.data.decode(errors="replace"))
            except ApiException:
                pass  # not started yet, or its container is gone
        return "".join(out)

    def container_pid(self, pod: str, container: str | None = None, namespace: str | None = None) -> int | None:
        """The host PID of the pod's running container's first process, None when it is not running."""
        status = self._status(pod, container, namespace)
        if status is None or not status.state.running or not status.container_id:
            return None
        return self.runtime.container_pid(status.container_id)

    def kill(self, pod: str, container: str | None = None, namespace: str | None = None,
             sig: int = signal.SIGKILL) -> int:
        """Signal a running pod's container process (fault injection); with SIGKILL it fails with exit code 137."""
        pid = self.container_pid(pod, container, namespace)
        if pid is None:
            raise RuntimeError(f"pod {pod} has no running container to signal")
        os.kill(pid, sig)
        return pid

    def delete_following(self, pod: str, timeout: float) -> tuple[str, int | None, str]:
        """Delete a running pod as a drain or an eviction does, following it to its end: (what it printed, streamed
        by `kubectl logs -f` through the API server; its container's exit code and termination message as the
        kubelet reported them before the pod object was removed). The stream can miss the last lines: a kubelet
        following a log that reaches its end checks the container first, and a deleted pod's container is removed
        soon after it exits. The termination message (FallbackToLogsOnError) is the log's tail, read from the
        finished file."""
        from kubernetes import watch

        selector = f"metadata.name={pod}"
        follow = subprocess.Popen(["kubectl", "logs", "-f", pod, "--namespace", self.namespace], env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        exit_code, message = None, ""
        try:
            first = follow.stdout.readline()  # attached (the pod has printed before it is deleted)
            since = self.core.list_namespaced_pod(self.namespace, field_selector=selector).metadata.resource_version
            self.core.delete_namespaced_pod(pod, self.namespace)
            for event in watch.Watch().stream(self.core.list_namespaced_pod, self.namespace, field_selector=selector,
                                              resource_version=since, timeout_seconds=int(timeout)):
                for status in event["object"].status.container_statuses or []:
                    if status.state.terminated is not None:
                        exit_code = status.state.terminated.exit_code
                        message = status.state.terminated.message or ""
                if event["type"] == "DELETED":
                    break
            else:
                raise TimeoutError(f"pod {pod} still there {timeout} s after its deletion")
            rest, _ = follow.communicate(timeout=30)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        return first + rest, exit_code, message

    def is_running(self, pod: str, namespace: str | None = None) -> bool:
        """True once the kubelet reports the pod's container running."""
        return self.container_pid(pod, None, namespace) is not None

    def pods(self, selector: str = "", namespace: str | None = None):
        return self.core.list_namespaced_pod(namespace or self.namespace, label_selector=selector).items

    def controller_job(self, release: str):
        """The release's newest controller Job (one per Helm revision), None before Helm created one."""
        jobs = self.batch.list_namespaced_job(self.namespace, label_selector=f"mysproj.io/run={release},"
                                                                            "mysproj.io/stage=controller").items
        return max(jobs, key=lambda j: int(j.metadata.labels["mysproj.io/revision"]), default=None)


_counter = itertools.count()


def _ensure_tools() -> None:
    needed = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "helm", "kubectl"]
    needed += ["kubelet"]
    if all(os.access(TOOLS / b, os.X_OK) for b in needed):
        return
    result = subprocess.run(["bash", str(REPO / "k8s" / "tools" / "install.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"k8s/tools/install.sh failed (run `make tools`):\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def pod_origin():
    """A dataset site for the pods: the Range-honouring file server of tests/http_origin.py (its URLs as pods reach
    them: `kube.origin_host` in place of 127.0.0.1)."""
    from http_origin import HttpOrigin

    origin = HttpOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def pod_mlflow(tmp_path_factory):
    """An MLflow tracking server for the pods (tests/mlflow_server.py): its port is reserved now and reached by the
    pods from the cluster's start (as `pod_origin`'s, at `kube.origin_host`), the server itself started by the test
    that calls `start()`, so only that test pays for it."""
    from loopback_ports import free_ports
    from mlflow_server import MlflowServer, mlflow_binary

    server = MlflowServer(mlflow_binary() or "", str(tmp_path_factory.mktemp("mlflow-pods")), free_ports(1)[0])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory, container_images, s3_server, pod_origin, pod_mlflow):
    """The session's control plane + node; use the module-scoped `kube` in tests."""
    _ensure_tools()
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.start()
    root = tmp_path_factory.mktemp("kube")
    loopback_ports = [pod_origin.server.server_address[1], pod_mlflow.port]  # served on the host's 127.0.0.1
    yield from _kubelet_cluster(root, container_images, s3_server, loopback_ports)


def _clients(kubeconfig: Path) -> dict:
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig),
           "PATH": f"{TOOLS}:{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return {"kubeconfig": kubeconfig, "env": env, "api_client": api, "core": client.CoreV1Api(api),
            "batch": client.BatchV1Api(api), "rbac": client.RbacAuthorizationV1Api(api), "node": NODE}


def _kubelet_cluster(root: Path, container_images: dict, s3_server, loopback_ports: list[int]):
    started = time.monotonic()
    cp, node = node_mod.up(root, TOOLS, [container_images["cpu"], container_images["gpu"]])
    s3_port = s3_server.ports["s3.port"]
    forwarders = []
    try:
        for port in (s3_port, *loopback_ports):
            forwarders.append(Forwarder((node.network.gateway, port), ("127.0.0.1", port)))
        linked = ", ".join(f"{name} {took:.1f} s" for name, took in node.imported.items())
        print(f"\n[kube] control plane + kubelet node up in {time.monotonic() - started:.1f} s (images: {linked})",
              file=sys.stderr)
        yield Kube(**_clients(cp.kubeconfig), server=cp.server, node_dir=node.workdir, controlplane_dir=cp.workdir,
                   images=container_images, s3_endpoint=f"http://{node.network.gateway}:{s3_port}",
                   origin_host=node.network.gateway, runtime=node)
    finally:
        for f in forwarders:
            f.close()
        started = time.monotonic()
        problems = node.stop()  # before the control plane: pods are deleted through it
        cp.stop()
        print(f"[kube] teardown took {time.monotonic() - started:.1f} s", file=sys.stderr)
        # The machine as it was: sysctls, fixed paths, cgroups, namespaces, mounts, the bridge, no process left.
        assert not problems, "the node's teardown left: " + "; ".join(problems)


@pytest.fixture(scope="module")
def kube(kube_cluster, request):
    """`kube_cluster` with a fresh namespace for this test module (deleted afterwards; the real namespace
    controller and the kubelet clean its pods up)."""
    ns = kube_cluster.new_namespace(request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:40].lower())
    yield dataclasses.replace(kube_cluster, namespace=ns)
    kube_cluster.core.delete_namespace(ns)
