"""TEST INFRASTRUCTURE: the node stand-in's container mode. Each pod container runs with podman (runtime runc,
lowered rlimits: the default crun and podman's raised rlimits fail on the test machines) from the pod's image, in
one network namespace shared by every pod of the node that holds nothing but `lo`. A forwarder exposes the API
server's and the object store's ports on that namespace's 127.0.0.1, so every pod is 127.0.0.1 as in process mode
and can reach those two services and each other, and nothing else.

What maps to what (Kubernetes -> podman), as a kubelet with a CRI runtime would apply it:
  image / imagePullPolicy        the local image (never pulled: no registry here); missing -> Waiting
                                 ErrImageNeverPull (policy Never) or ErrImagePull <-> ImagePullBackOff, forever
  command / args                 --entrypoint (replaces the image's ENTRYPOINT and CMD) / arguments after the image
  env, envFrom                   --env-file (kept off the command line: it may hold Secret values; a value that
                                 spans lines goes through podman's own environment)
  workingDir                     --workdir
  runAsUser/runAsGroup           --user UID:GID (container over pod); runAsNonRoot refuses UID 0 and non-numeric users
  fsGroup, supplementalGroups    --group-add, and group ownership (setgid) of emptyDir/PVC/Secret/ConfigMap volumes
  readOnlyRootFilesystem         --read-only (no tmpfs at /tmp either: only the pod's volumes are writable)
  allowPrivilegeEscalation=false --security-opt no-new-privileges
  capabilities drop/add          --cap-drop / --cap-add; privileged -> --privileged
  seccompProfile Unconfined      --security-opt seccomp=unconfined (RuntimeDefault = podman's default profile)
  limits.memory / limits.cpu     --memory / --cpus (nvidia.com/gpu: capacity only, no device)
  volumes                        bind mounts at their mountPaths (readOnly -> :ro); the ServiceAccount token at
                                 /var/run/secrets/kubernetes.io/serviceaccount
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

from kubernetes import client
from kubernetes.utils.quantity import parse_quantity

PODMAN = ["podman", "--runtime", "runc", "--events-backend", "file"]
RLIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLONE_NEWNET = 0x40000000
PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff")


class ImageError(Exception):
    """The pod's image cannot be used (a kubelet's Waiting reason and message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PodNetwork:
    """A network namespace with only `lo` up, and a forwarder of host ports into it."""

    def __init__(self, name: str, ports: list[int]):
        self.name, self.ports = name, ports
        self.path = f"/run/netns/{name}"
        self.stopping = threading.Event()
        self.listeners: list[socket.socket] = []

    def create(self) -> PodNetwork:
        self.remove()
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        self.listeners = self._listen_inside()
        for sock, port in zip(self.listeners, self.ports):
            threading.Thread(target=self._accept, args=(sock, port), daemon=True, name=f"fwd-{port}").start()
        return self

    def remove(self) -> None:
        self.stopping.set()
        for sock in self.listeners:
            sock.close()
        if os.path.exists(self.path):
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self.stopping = threading.Event()

    def _listen_inside(self) -> list[socket.socket]:
        """Listening sockets created inside the namespace (a socket keeps the namespace it was made in); the
        thread that makes them switches there and back, so connections out are made from the host's namespace."""
        result: list = []

        def make():
            libc = ctypes.CDLL(None, use_errno=True)
            with open("/proc/thread-self/ns/net") as home, open(self.path) as pods:
                if libc.setns(pods.fileno(), CLONE_NEWNET) != 0:
                    result.append(OSError(ctypes.get_errno(), f"setns into {self.path}"))
                    return
                try:
                    for port in self.ports:
                        s = socket.socket()
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("127.0.0.1", port))
                        s.listen(64)
                        result.append(s)
                finally:
                    libc.setns(home.fileno(), CLONE_NEWNET)

        t = threading.Thread(target=make, name="netns-listen")
        t.start()
        t.join()
        errors = [r for r in result if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return result

    def _accept(self, sock: socket.socket, port: int) -> None:
        while not self.stopping.is_set():
            try:
                inside, _ = sock.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", port), timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


class Podman:
    """How the stand-in runs one container with podman; `label` marks every container this node started."""

    def __init__(self, network: PodNetwork, label: str):
        self.network, self.label = network, label

    def image_user(self, image: str) -> str:
        out = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Config.User}}", image],
                             capture_output=True, text=True)
        return out.stdout.strip()

    def check_image(self, c: client.V1Container) -> None:
        """Raise ImageError as a kubelet would report the image: present, or why it cannot be had."""
        if not c.image or any(ch.isspace() for ch in c.image):
            raise ImageError("InvalidImageName", f'Failed to apply default image tag "{c.image}"')
        present = subprocess.run([*PODMAN, "image", "exists", c.image], capture_output=True).returncode == 0
        if present:
            return
        if (c.image_pull_policy or "IfNotPresent") == "Never":
            raise ImageError("ErrImageNeverPull",
                             f'Container image "{c.image}" is not present with pull policy of Never')
        raise ImageError("ErrImagePull", f'rpc error: code = Unknown desc = failed to pull image "{c.image}": '
                                         "the node stand-in never pulls (no registry): build it with `make images`")

    def user(self, pod: client.V1Pod, c: client.V1Container) -> tuple[str | None, list[str]]:
        """(--user value or None for the image's, problems that keep the container from being created)."""
        psc = pod.spec.security_context or client.V1PodSecurityContext()
        csc = c.security_context or client.V1SecurityContext()
        uid = csc.run_as_user if csc.run_as_user is not None else psc.run_as_user
        gid = csc.run_as_group if csc.run_as_group is not None else psc.run_as_group
        non_root = csc.run_as_non_root if csc.run_as_non_root is not None else psc.run_as_non_root
        problems = []
        if non_root:
            effective = str(uid) if uid is not None else self.image_user(c.image).split(":")[0]
            if effective in ("", "0", "root"):
                problems.append("container has runAsNonRoot and image will run as root")
            elif not effective.isdigit():
                problems.append(f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                                "cannot verify user is non-root")
        if uid is None:  # the image's user, with the group when one is given
            uid = self.image_user(c.image).split(":")[0] or "0" if gid is not None else None
        if uid is None:
            return None, problems
        return (f"{uid}:{gid}" if gid is not None else str(uid)), problems

    def run_argv(self, pod: client.V1Pod, c: client.V1Container, name: str, env_file: Path,
                 mounts: list[tuple[str, Path, bool]], user: str | None, inherit: list[str] = ()) -> list[str]:
        """`podman run` of container `c`; `inherit` names variables podman passes on from its own environment."""
        psc = pod.spec.security_context or client.V1PodSecurityContext()
        csc = c.security_context or client.V1SecurityContext()
        argv = [*PODMAN, "run", "--rm", "--name", name, "--label", self.label, "--pull", "never", *RLIMITS,
                "--network", f"ns:{self.network.path}", "--hostname", (pod.spec.hostname or pod.metadata.name)[:63],
                "--env-file", str(env_file), *[a for k in inherit for a in ("--env", k)], "--stop-signal", "SIGTERM"]
        if user:
            argv += ["--user", user]
        for g in [psc.fs_group, *(psc.supplemental_groups or [])]:
            if g is not None:
                argv += ["--group-add", str(g)]
        if csc.read_only_root_filesystem:
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if csc.allow_privilege_escalation is False:
            argv += ["--security-opt", "no-new-privileges"]
        if csc.privileged:
            argv += ["--privileged"]
        caps = csc.capabilities or client.V1Capabilities()
        argv += [a for cap in caps.drop or [] for a in ("--cap-drop", cap)]
        argv += [a for cap in caps.add or [] for a in ("--cap-add", cap)]
        seccomp = csc.seccomp_profile or psc.seccomp_profile
        if seccomp is not None and seccomp.type == "Unconfined":
            argv += ["--security-opt", "seccomp=unconfined"]
        limits = (c.resources and c.resources.limits) or {}
        if "memory" in limits:
            argv += ["--memory", str(int(parse_quantity(limits["memory"])))]
        if "cpu" in limits:
            argv += ["--cpus", f"{float(parse_quantity(limits['cpu'])):g}"]
        if c.working_dir:
            argv += ["--workdir", c.working_dir]
        for target, local, read_only in mounts:
            argv += ["--volume", f"{local}:{target}:{'ro' if read_only else 'rw'}"]
        if c.command:
            argv += ["--entrypoint", json.dumps(c.command)]
        return [*argv, c.image, *(c.args or [])]

    def pid(self, name: str) -> int:
        """The host PID of the container's first process (0 until it runs)."""
        out = subprocess.run([*PODMAN, "inspect", "--type", "container", "--format", "{{.State.Pid}}", name],
                             capture_output=True, text=True)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def stop(self, name: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after the grace period, as a kubelet stops a container."""
        subprocess.run([*PODMAN, "stop", "--time", str(max(0, int(grace))), name], capture_output=True)

    def remove_all(self) -> None:
        ids = subprocess.run([*PODMAN, "ps", "-aq", "--filter", f"label={self.label}"], capture_output=True,
                             text=True).stdout.split()
        if ids:
            subprocess.run([*PODMAN, "rm", "-f", "--time", "0", *ids], capture_output=True)


def own(path: Path, gid: int | None, mode: int) -> None:
    """Volume ownership as a kubelet sets it: the fsGroup owns it (setgid on folders), else it is open to all."""
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
