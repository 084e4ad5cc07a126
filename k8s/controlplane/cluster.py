"""A real Kubernetes v1.20.2 control plane on 127.0.0.1, for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler as local processes on free ports, stopped by PID.

    python k8s/controlplane/cluster.py up DIR     # prints the kubeconfig path once the API answers (~4 s)
    python k8s/controlplane/cluster.py down DIR   # stops what `up` started (PIDs in DIR/pids)

Binaries come from `make tools` (k8s/tools/install.sh) in <repo>/.tools/bin. Standard library only, so it runs
before the venv exists. Auth: an admin bearer token in group system:masters (token file), Node,RBAC authorization
with NodeRestriction, a service-account key pair so the token controller and TokenRequest work; serving certs from
a private CA, and a client cert the API server shows the kubelet (logs, exec). The node is k8s/node/node.py: a real
kubelet with containerd, whose pods reach the API server on the pod bridge's gateway (`address`, port 443).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / ".tools" / "bin"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def sign_cert(pki: Path, name: str, subject: str, ips: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> None:
    """pki/<name>.key + pki/<name>.crt signed by pki/ca.*; with IP/DNS names a serving cert, else a client cert."""
    alt = ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{d}" for d in dns])
    usage = "serverAuth" if alt else "clientAuth"
    (pki / f"{name}.ext").write_text((f"subjectAltName={alt}\n" if alt else "") + f"extendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)


def make_pki(pki: Path, address: str = "127.0.0.1", service_ip: str = SERVICE_IP) -> None:
    """CA, the API server's serving cert, its client cert for kubelets (system:masters), service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=mysproj-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    sign_cert(pki, "serving", "/CN=kube-apiserver", ips=tuple(dict.fromkeys(("127.0.0.1", address, service_ip))),
              dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"))
    sign_cert(pki, "kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str = "", namespace: str = "default",
                     cert: Path | None = None) -> None:
    """A token user, or a client-certificate user when `cert` (with the key beside it, .key) is given."""
    user = {"token": token} if cert is None else {"client-certificate": str(cert),
                                                   "client-key": str(cert.with_suffix(".key"))}
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": namespace}}],
    }
    path.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
    path.chmod(0o600)


@dataclass
class ControlPlane:
    """One control plane under `workdir`. `start()` returns once /readyz answers; `stop()` kills by PID.
    The API server listens on `address`:`api_port` (a free port when 0); the `kubernetes` Service gets the first
    address of `service_cidr`."""

    workdir: Path
    bin_dir: Path = DEFAULT_BIN
    pids: dict[str, int] = field(default_factory=dict)
    api_port: int = 0
    token: str = ""
    address: str = "127.0.0.1"
    service_cidr: str = SERVICE_CIDR

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"{path} is missing: run `make tools` (k8s/tools/install.sh) first")
        return str(path)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps the descriptor
        proc = subprocess.Popen([self.binary(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.pids[name] = proc.pid
        (self.workdir / "pids").write_text(json.dumps(self.pids))

    def start(self, timeout: float = 90) -> ControlPlane:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in COMPONENTS:
            self.binary(name)
        pki = self.workdir / "pki"
        make_pki(pki, self.address, first_address(self.service_cidr))
        self.token = secrets.token_hex(16)
        (self.workdir / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        etcd_port, etcd_peer = free_port(), free_port()
        self.api_port = self.api_port or free_port()
        write_kubeconfig(self.kubeconfig, self.server, self.ca_file, self.token)
        try:
            self._spawn("etcd", [
                f"--data-dir={self.workdir / 'etcd'}", "--name=test",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=test=http://127.0.0.1:{etcd_peer}",
                "--quota-backend-bytes=2147483648",
            ])
            self._spawn("kube-apiserver", [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}", f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                "--insecure-port=0",
                f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={self.workdir / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true", f"--service-cluster-ip-range={self.service_cidr}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                # Logs, exec: the API server calls the kubelet, each proving itself with a cert of our CA.
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--event-ttl=1h", "--v=1",
            ])
            self._wait_ready(timeout)
            common = [f"--kubeconfig={self.kubeconfig}", "--port=0", "--bind-address=127.0.0.1", "--v=1",
                      "--leader-elect=false"]
            self._spawn("kube-controller-manager", [
                *common, f"--secure-port={free_port()}",
                f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true", f"--service-cluster-ip-range={self.service_cidr}",
                "--controllers=*", "--concurrent-gc-syncs=5",
                "--node-monitor-period=1s",  # a new node's not-ready taint goes within a second of Ready
            ])
            self._spawn("kube-scheduler", [*common, f"--secure-port={free_port()}"])
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout
        while True:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited during start-up; its log ends:\n{tail}")
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready after {timeout} s; see {self.workdir}/kube-apiserver.log")
            time.sleep(0.2)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM in reverse start order, SIGKILL whatever is left after `grace` seconds."""
        if not self.pids and (self.workdir / "pids").exists():
            self.pids = json.loads((self.workdir / "pids").read_text())
        for pid in reversed(list(self.pids.values())):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pid in self.pids.values():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(pid, signal.SIGKILL)
            _reap(pid)
        self.pids = {}
        (self.workdir / "pids").unlink(missing_ok=True)


def first_address(cidr: str) -> str:
    """The `kubernetes` Service's address: the first host address of the service range."""
    import ipaddress

    return str(next(ipaddress.ip_network(cidr).hosts()))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (the `down` command): fall back to signal 0
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"  # a zombie whose parent (not us) has yet to reap it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("dir", type=Path)
    p.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN)
    a = p.parse_args(argv)
    cp = ControlPlane(a.dir.resolve(), a.bin_dir)
    if a.action == "up":
        started = time.monotonic()
        cp.start()
        print(cp.kubeconfig)
        took = time.monotonic() - started
        print(f"control plane up in {took:.1f} s (PIDs in {cp.workdir / 'pids'})", file=sys.stderr)
    else:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
