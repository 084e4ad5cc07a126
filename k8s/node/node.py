"""A real node for the test cluster: kubelet v1.20.2 with containerd 1.6, runc and the CNI bridge plugin on this
machine, pods on a private bridge whose gateway address is also the API server's and the `kubernetes` Service's.

    python3 k8s/node/node.py up DIR [--image NAME ...]   # control plane + node + images; prints the kubeconfig
    python3 k8s/node/node.py down DIR                    # stops both by PID and puts the machine back

Binaries come from `make tools` (k8s/tools/install.sh): kubelet and the control plane in <repo>/.tools/bin,
containerd, runc, CNI plugins and catatonit from Debian. Images go from the local podman storage into the node's
containerd as hard links (k8s/node/image_links.py): no registry is involved, pods use pull policy Never or
IfNotPresent. Everything the node writes lives under DIR except what k8s/node/host.py records and restores.
Standard library only, so it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "controlplane")]
import cluster  # noqa: E402  (k8s/controlplane/cluster.py)
import host  # noqa: E402
import image_links  # noqa: E402

NODE_NAME = "gpu-node-0"
PAUSE_IMAGE = "localhost/mysproj-pause:catatonit"
CATATONIT = "/usr/bin/catatonit"
CNI_BIN = "/usr/lib/cni"
RUNC = "/usr/sbin/runc"


def pick_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.250.0.0/16 that no interface or route of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout \
        + subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for i in range(10, 250):
        net = ipaddress.ip_network(f"10.250.{i}.0/24")
        if f"10.250.{i}." not in used:
            return net
    raise RuntimeError("no free /24 in 10.250.0.0/16 for the pod bridge")


@dataclass
class PodNetwork:
    """The pods' bridge. Its gateway (.1) is a local address of this machine: the API server and the test's S3
    forwarder listen there. Pods get .128-.254; the Service range is .0/25, so the `kubernetes` Service's address
    is the gateway itself and in-cluster clients reach the API server without a kube-proxy.

    The bridge has a MAC address of its own: one it picks itself is its ports' lowest, so it changes as pods'
    veths come and go, and a pod that cached the old one in its ARP table sends into the void until that entry
    expires (its TCP connections to the API server and the object store stalled for minutes, in backoff)."""

    subnet: str
    bridge: str

    @classmethod
    def create(cls) -> PodNetwork:
        net = pick_subnet()
        self = cls(str(net), f"mysproj-br{net.network_address.packed[2]}")
        for cmd in (["ip", "link", "add", self.bridge, "type", "bridge"],
                    ["ip", "link", "set", self.bridge, "address", self.mac],
                    ["ip", "addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge],
                    ["ip", "link", "set", self.bridge, "up"]):
            subprocess.run(cmd, check=True, capture_output=True)
        return self

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address + 1)

    @property
    def mac(self) -> str:
        """The bridge's fixed address: locally administered (02:), then the gateway's four bytes."""
        return ":".join(["02", "00", *(f"{b:02x}" for b in ipaddress.ip_address(self.gateway).packed)])

    @property
    def service_cidr(self) -> str:
        return str(ipaddress.ip_network(self.subnet).subnets(new_prefix=25).__next__())

    def cni_config(self, ipam_dir: Path) -> dict:
        net = ipaddress.ip_network(self.subnet)
        return {"cniVersion": "0.4.0", "name": "mysproj-pods", "plugins": [{
            "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(ipam_dir), "ranges": [[{
                "subnet": self.subnet, "gateway": self.gateway,
                "rangeStart": str(net.network_address + 128), "rangeEnd": str(net.broadcast_address - 1)}]]}}]}

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def pause_image_archive(path: Path) -> None:
    """A docker-archive holding one layer, /pause = Debian's static catatonit: the pod sandbox's process."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(CATATONIT, arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755
        with open(CATATONIT, "rb") as f:
            tar.addfile(info, f)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": ["/pause", "-P"], "User": "65535:65535"},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@dataclass
class Node:
    """containerd + kubelet under `workdir`, registered with `cp` as `name`. `start()` returns once the node is
    Ready and untainted; `stop()` deletes every pod, stops both by PID and restores the machine."""

    workdir: Path
    cp: cluster.ControlPlane
    network: PodNetwork
    name: str = NODE_NAME
    gpus: int = 8
    gpu_product: str = "NVIDIA-A100-SXM4-80GB"
    pids: dict[str, int] = field(default_factory=dict)
    imported: dict[str, float] = field(default_factory=dict)  # image -> seconds its copy into containerd took

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def task_dir(self) -> Path:
        """runc v2 shims keep each container's init.pid here."""
        return self.workdir / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args], **kw)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.pids[name] = proc.pid
        self._save()

    def _save(self) -> None:
        (self.workdir / "node.json").write_text(json.dumps({
            "pids": self.pids, "subnet": self.network.subnet, "bridge": self.network.bridge}))

    # ------------------------------------------------------------------------------------------------ start

    def start_runtime(self) -> Node:
        """The machine's state recorded, then containerd with its own root, state, socket and CNI config."""
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / "host.json").exists():
            host.save(host.snapshot(), self.workdir / "host.json")
        self._save()
        d = self.workdir / "containerd"
        (d / "net.d").mkdir(parents=True, exist_ok=True)
        (d / "net.d" / "10-mysproj.conflist").write_text(json.dumps(self.network.cni_config(d / "ipam"), indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "config.toml").write_text(f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d / 'net.d'}"
""")
        self._spawn("containerd", ["containerd", "--config", str(d / "config.toml")])
        deadline = time.monotonic() + 30
        while self.ctr("version", capture_output=True).returncode != 0:
            if not _alive(self.pids["containerd"]) or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: {self._tail('containerd')}")
            time.sleep(0.1)
        archive = d / "pause.tar"
        pause_image_archive(archive)
        self.ctr("images", "import", str(archive), check=True, capture_output=True)
        return self

    def import_images(self, images: list[str]) -> dict[str, float]:
        """Make podman's images images of the node's containerd; seconds each took. Hard links into containerd's
        snapshots (k8s/node/image_links.py: seconds) where podman's storage allows, else a full copy
        (`podman save | ctr images import`: minutes for a multi-GB image)."""
        took = {}
        for image in images:
            started = time.monotonic()
            try:
                image_links.link_image(self.ctr, image)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"node: {image} copied, not linked ({e})", file=sys.stderr)
                self._copy_image(image)
            took[image] = time.monotonic() - started
        self.imported.update(took)
        return took

    def _copy_image(self, image: str) -> None:
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", image], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        load = self.ctr("images", "import", "-", stdin=save.stdout, capture_output=True)
        save.stdout.close()
        err = save.stderr.read().decode(errors="replace")
        if save.wait() != 0 or load.returncode != 0:
            raise RuntimeError(f"importing {image} into containerd failed: {err} "
                               f"{load.stderr.decode(errors='replace')}")

    def start_kubelet(self, timeout: float = 90) -> Node:
        pki = self.cp.workdir / "pki"
        kd = self.workdir / "kubelet"
        kd.mkdir(parents=True, exist_ok=True)
        name = f"kubelet-{self.name}"
        cluster.sign_cert(pki, name, f"/O=system:nodes/CN=system:node:{self.name}")
        cluster.sign_cert(pki, f"{name}-serving", f"/CN={self.name}", ips=(self.network.gateway, "127.0.0.1"),
                          dns=(self.name,))
        cluster.write_kubeconfig(self.workdir / "kubelet.kubeconfig", self.cp.server, pki / "ca.crt",
                                 cert=pki / f"{name}.crt")
        port = cluster.free_port()
        config = {
            "kind": "KubeletConfiguration", "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "address": self.network.gateway, "port": port, "readOnlyPort": 0, "healthzPort": 0,
            "tlsCertFile": str(pki / f"{name}-serving.crt"), "tlsPrivateKeyFile": str(pki / f"{name}-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failSwapOn": False, "makeIPTablesUtilChains": False,
            # No registry: an image removed by the garbage collector could never come back.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "2s", "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf", "containerLogMaxSize": "50Mi",
        }
        (self.workdir / "kubelet.yaml").write_text(json.dumps(config, indent=1))  # JSON is valid YAML
        labels = {"nvidia.com/gpu.product": self.gpu_product, "nvidia.com/gpu.present": "true",
                  "nvidia.com/gpu.count": str(self.gpus)}
        self._spawn("kubelet", [
            str(self.cp.bin_dir / "kubelet"), f"--config={self.workdir / 'kubelet.yaml'}",
            f"--kubeconfig={self.workdir / 'kubelet.kubeconfig'}", f"--root-dir={kd}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.socket}",
            f"--hostname-override={self.name}", f"--node-ip={self.network.gateway}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()), "--v=1",
            # Keep a restarted container's predecessor (and its log, `kubectl logs --previous`) for a while.
            "--minimum-container-ttl-duration=5m", "--maximum-dead-containers-per-container=2",
        ])
        self._wait_node(timeout)
        if self.gpus:
            # GPUs as an extended resource: capacity the scheduler counts (no device plugin, no devices).
            patch = {"status": {"capacity": {"nvidia.com/gpu": str(self.gpus)},
                                "allocatable": {"nvidia.com/gpu": str(self.gpus)}}}
            self._api("PATCH", f"/api/v1/nodes/{self.name}/status", patch,
                      content_type="application/strategic-merge-patch+json")
        return self

    def _wait_node(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not _alive(self.pids["kubelet"]):
                raise RuntimeError(f"kubelet exited: {self._tail('kubelet')}")
            try:
                node = self._api("GET", f"/api/v1/nodes/{self.name}")
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in node.get("status", {}).get("conditions", []))
                tainted = any(t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints", []))
                if ready and not tainted:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} not Ready after {timeout} s: {self._tail('kubelet')}")
            time.sleep(0.3)

    def _api(self, method: str, path: str, body: dict | None = None,
             content_type: str = "application/json") -> dict:
        ctx = ssl.create_default_context(cafile=str(self.cp.ca_file))
        req = urllib.request.Request(self.cp.server + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {self.cp.token}",
                                              "Content-Type": content_type})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def _tail(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    # ------------------------------------------------------------------------------------------------ pods

    def container_pid(self, container_id: str) -> int | None:
        """The host PID of a running container's first process (`containerd://<id>` or the bare id)."""
        try:
            return int((self.task_dir / container_id.split("://")[-1] / "init.pid").read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------------------------------------ stop

    def delete_all_pods(self, timeout: float = 40) -> None:
        """Through the API, so that the kubelet stops every sandbox and releases its network namespace."""
        try:
            pods = self._api("GET", "/api/v1/pods")["items"]
            for p in pods:
                m = p["metadata"]
                try:
                    self._api("DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                              {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
                except OSError:
                    pass
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(self.pids.get("kubelet", 0)):
            listed = self.ctr("tasks", "list", "-q", capture_output=True, text=True)
            if listed.returncode != 0 or not listed.stdout.split():
                return
            time.sleep(0.5)

    def stop(self, grace: float = 10) -> list[str]:
        """Everything `start_*` did, undone; returns what could not be undone (also written to teardown.log)."""
        self.workdir = Path(self.workdir).resolve()
        saved = json.loads((self.workdir / "node.json").read_text()) if (self.workdir / "node.json").exists() else {}
        self.pids = self.pids or saved.get("pids", {})
        started = dict(self.pids)
        if "kubelet" in self.pids:
            self.delete_all_pods()
            _stop(self.pids.pop("kubelet"), grace)
        if "containerd" in self.pids:
            listed = self.ctr("tasks", "list", "-q", capture_output=True, text=True)
            for task in listed.stdout.split() if listed.returncode == 0 else []:
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, capture_output=True)
                self.ctr("tasks", "delete", "--force", task, capture_output=True)
            _stop(self.pids.pop("containerd"), grace)
        self._stop_shims()
        host.unmount_all(str(self.workdir))
        if not host.mounts_under(str(self.workdir)):
            # The images' layers and snapshots: gigabytes that no later run reuses.
            shutil.rmtree(self.workdir / "containerd" / "root", ignore_errors=True)
        self.network.remove()
        before = json.loads((self.workdir / "host.json").read_text()) if (self.workdir / "host.json").exists() else {}
        problems = host.restore(before) if before else []
        # Checked, not assumed: what is still there now.
        problems += [p for p in host.leftovers(before) if p not in problems] if before else []
        problems += [f"mount {m} left behind" for m in host.mounts_under(str(self.workdir))]
        if subprocess.run(["ip", "link", "show", self.network.bridge], capture_output=True).returncode == 0:
            problems.append(f"bridge {self.network.bridge} left behind")
        problems += [f"{name} (pid {pid}) still running" for name, pid in started.items() if _alive(pid)]
        problems += [f"containerd shim (pid {pid}) still running" for pid in self._shims()]
        self._save()
        (self.workdir / "teardown.log").write_text("\n".join(problems) + "\n")
        return problems

    def _stop_shims(self) -> None:
        for pid in self._shims():
            _stop(pid, 2)

    def _shims(self) -> list[int]:
        """containerd's shims outlive it by design; ours are the ones started with our socket's address."""
        mine, found = str(self.socket).encode(), []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and mine in argv:
                found.append(int(proc.name))
        return found


def _alive(pid: int) -> bool:
    return bool(pid) and cluster._alive(pid)


def _stop(pid: int, grace: float) -> None:
    cluster._signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster._signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster._reap(pid)


def up(workdir: Path, bin_dir: Path, images: list[str]) -> tuple[cluster.ControlPlane, Node]:
    """Bridge, control plane on its gateway, containerd, images, kubelet; all undone if a step fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    network = PodNetwork.create()
    cp = cluster.ControlPlane(workdir / "controlplane", bin_dir, address=network.gateway, api_port=443,
                              service_cidr=network.service_cidr)
    node = Node(workdir / "node", cp, network)
    try:
        node.start_runtime()
        cp.start()
        node.import_images(images)
        node.start_kubelet()
    except BaseException:
        node.stop()
        cp.stop()
        raise
    return cp, node


def down(workdir: Path, bin_dir: Path) -> list[str]:
    saved = json.loads((workdir / "node" / "node.json").read_text())
    cp = cluster.ControlPlane(workdir / "controlplane", bin_dir)
    node = Node(workdir / "node", cp, PodNetwork(saved["subnet"], saved["bridge"]))
    problems = node.stop()  # before the control plane: the kubelet deletes pods through it
    cp.stop()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("dir", type=Path)
    p.add_argument("--bin-dir", type=Path, default=cluster.DEFAULT_BIN)
    p.add_argument("--image", action="append", default=[], help="a podman image to copy into the node")
    a = p.parse_args(argv)
    workdir = a.dir.resolve()
    if a.action == "up":
        started = time.monotonic()
        cp, _ = up(workdir, a.bin_dir, a.image)
        print(cp.kubeconfig)
        print(f"control plane + node up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 0
    problems = down(workdir, a.bin_dir)
    for line in problems:
        print(f"not undone: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
