"""The `kube` fixture: a real Kubernetes v1.20.2 control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler on 127.0.0.1) plus the node stand-in `tests/infra/node_agent.py` in container mode, shared by the
whole session; each test module gets a fresh namespace. Every pod runs as a real container (podman) from the
project's images (`kube.images`: the CPU and GPU images of this work tree, built by `make images`), in a network
namespace where only the API server and the session's S3 server are reachable. See k8s/README.md for what is real
and what the stand-in emulates.

    def test_x(kube):
        kube.batch.create_namespaced_job(kube.namespace, body)   # image: kube.images["cpu"]
        subprocess.run(["helm", "install", ..., *kube.image_values], env=kube.env)  # KUBECONFIG, helm, the venv
        kube.pod_log(pod_name); kube.kill(pod_name)              # stand-in extras: output file, fault injection
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
AGENT = REPO / "tests" / "infra" / "node_agent.py"
NODE = "gpu-node-0"
GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cluster_mod = _load("mysproj_test_controlplane", REPO / "k8s" / "controlplane" / "cluster.py")
sys.path.insert(0, str(AGENT.parent))  # the stand-in's modules import each other by name
pods_mod = _load("pod_containers", AGENT.parent / "pod_containers.py")  # Podman, to clean up
agent_mod = _load("mysproj_test_pod_runner", AGENT.parent / "pod_runner.py")  # pod_dir, kill_container


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
    agent_dir: Path           # the stand-in's state: pods/<ns>/<pod>/<container>.log, agent.log
    controlplane_dir: Path    # component logs, PKI, kubeconfig
    node: str
    api_client: object
    core: object              # kubernetes.client.CoreV1Api
    batch: object             # BatchV1Api
    rbac: object              # RbacAuthorizationV1Api
    images: dict[str, str]    # {"cpu": name, "gpu": name} in the local container storage
    namespace: str = "default"
    gpu_product: str = GPU_PRODUCT  # the node's nvidia.com/gpu.product label
    wait_for = staticmethod(wait_for)

    @property
    def image_sets(self) -> list[str]:
        """Chart values (key=value) that point at the local images (never pulled: no registry here)."""
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

    def log_path(self, pod: str, container: str | None = None, namespace: str | None = None) -> Path:
        d = agent_mod.pod_dir(self.agent_dir, namespace or self.namespace, pod)
        if container:
            return d / f"{container}.log"
        logs = sorted(d.glob("*.log"))
        return logs[0] if logs else d / "missing.log"

    def pod_log(self, pod: str, container: str | None = None, namespace: str | None = None) -> str:
        """All output the pod's container printed (every restart, appended), as the stand-in recorded it."""
        path = self.log_path(pod, container, namespace)
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, pod: str, container: str | None = None, namespace: str | None = None,
             sig: int = signal.SIGKILL) -> int:
        """Kill a running pod's process (fault injection); the pod then fails with exit code 128+sig."""
        return agent_mod.kill_container(self.agent_dir, namespace or self.namespace, pod, container, sig)

    def is_running(self, pod: str, namespace: str | None = None) -> bool:
        """True once the stand-in has the pod's process running (its PID file exists)."""
        return any(agent_mod.pod_dir(self.agent_dir, namespace or self.namespace, pod).glob("*.pid"))

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
    if all(os.access(TOOLS / b, os.X_OK) for b in needed):
        return
    result = subprocess.run(["bash", str(REPO / "k8s" / "tools" / "install.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"k8s/tools/install.sh failed (run `make tools`):\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def pod_origin():
    """A dataset site for the pods: the Range-honouring file server of tests/http_origin.py, reachable from every
    pod at the same URL as from the test (its port is forwarded into the pods' network namespace)."""
    from http_origin import HttpOrigin

    origin = HttpOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory, container_images, s3_server, pod_origin):
    """The session's control plane + node stand-in; use the module-scoped `kube` in tests."""
    from kubernetes import client, config

    _ensure_tools()
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.start()
    root = tmp_path_factory.mktemp("kube")
    started = time.monotonic()
    cp = cluster_mod.ControlPlane(root / "controlplane", TOOLS).start()
    agent_dir = root / "agent"
    agent_dir.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    netns = f"mysproj-pods-{os.getpid()}"
    cmd = [sys.executable, str(AGENT), "--kubeconfig", str(cp.kubeconfig), "--state-dir", str(agent_dir),
           "--node", NODE, "--gpus", "8", "--gpu-product", GPU_PRODUCT, "--containers", "--netns", netns,
           "--forward-port", str(s3_server.ports["s3.port"]),
           "--forward-port", str(pod_origin.server.server_address[1]),
           "--tls-cert", str(cp.workdir / "pki" / "serving.crt"), "--tls-key", str(cp.workdir / "pki" / "serving.key")]
    with open(agent_dir / "agent.log", "ab") as out:
        agent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=cfg)
        api = client.ApiClient(cfg)
        core = client.CoreV1Api(api)

        def node_ready():
            if agent.poll() is not None:
                raise RuntimeError(f"node agent exited: {(agent_dir / 'agent.log').read_text()[-3000:]}")
            nodes = core.list_node(field_selector=f"metadata.name={NODE}").items
            conds = nodes[0].status.conditions or [] if nodes else []
            ready = any(c.type == "Ready" and c.status == "True" for c in conds)
            return ready and not any(t.key.startswith("node.kubernetes.io/") for t in nodes[0].spec.taints or [])

        wait_for(node_ready, 60, f"node {NODE} Ready and untainted")
        print(f"\n[kube] control plane + node stand-in up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig),
               "PATH": f"{TOOLS}:{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        yield Kube(kubeconfig=cp.kubeconfig, server=cp.server, env=env, agent_dir=agent_dir,
                   controlplane_dir=cp.workdir, node=NODE, api_client=api, core=core,
                   batch=client.BatchV1Api(api), rbac=client.RbacAuthorizationV1Api(api), images=container_images)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        # What a killed agent may have left: its containers and its network namespace.
        pods_mod.Podman(None, f"io.mysproj.node-agent={agent_dir.resolve()}").remove_all()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        cp.stop()


@pytest.fixture(scope="module")
def kube(kube_cluster, request):
    """`kube_cluster` with a fresh namespace for this test module (deleted afterwards; the real namespace
    controller and the stand-in clean its pods up)."""
    ns = kube_cluster.new_namespace(request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:40].lower())
    yield dataclasses.replace(kube_cluster, namespace=ns)
    kube_cluster.core.delete_namespace(ns)
