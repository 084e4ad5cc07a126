"""TEST INFRASTRUCTURE: how the node stand-in (node_agent.py) runs one pod as local processes and reports its
status like a kubelet. What is and isn't emulated: node_agent.py's docstring and k8s/README.md."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils.quantity import parse_quantity
from pod_containers import PULL_ERRORS, SA_DIR, ImageError, own

if TYPE_CHECKING:
    from node_agent import Agent

REPO = Path(__file__).resolve().parents[2]
MERGE = "application/merge-patch+json"
NAME_SLOT = "<container name>"  # replaced by each attempt's container name in a podman command line
REMAPPED = {"python", "python3", "python3.11", "mysproj", "torchrun", "deepspeed", "pip"}
# Every pod is 127.0.0.1, so a Service DNS name (e.g. the headless Service giving FT rank 0 a name) resolves there.
SERVICE_DNS = re.compile(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b\.?")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(msg: str) -> None:
    print(f"{now()} node-agent: {msg}", file=sys.stderr, flush=True)


def pod_dir(state: Path, namespace: str, pod: str) -> Path:
    return Path(state) / "pods" / namespace / pod


def kill_container(state: Path, namespace: str, pod: str, container: str | None = None,
                   sig: int = signal.SIGKILL) -> int:
    """Fault injection: signal a running container's process (as an OOM kill or node problem would). Returns the PID.

    The agent then reports exit code 128+sig and the Job controller handles the failure as on a real cluster."""
    d = pod_dir(state, namespace, pod)
    pids = sorted(d.glob(f"{container or '*'}.pid"))
    if not pids:
        raise ProcessLookupError(f"no running container of pod {namespace}/{pod} (no .pid file in {d})")
    pid = int(pids[0].read_text())
    os.kill(pid, sig)
    return pid


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, anything else stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class ConfigError(Exception):
    """The pod's configuration cannot be resolved yet (a missing Secret/ConfigMap): CreateContainerConfigError."""


class PodRunner(threading.Thread):
    """Runs one pod: init containers in order, then the containers side by side, reporting status as a kubelet."""

    def __init__(self, agent: Agent, pod: client.V1Pod):
        super().__init__(daemon=True, name=f"pod-{pod.metadata.name}")
        self.agent, self.pod = agent, pod
        self.ns, self.name, self.uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        self.dir = pod_dir(agent.state, self.ns, self.name)
        self.run_dir = self.dir / f"run-{self.uid[:8]}"
        self.stopped = threading.Event()
        self.finalize = False
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.attempts: dict[str, int] = {}
        self.statuses: dict[str, dict] = {}
        self.init_statuses: dict[str, dict] = {}
        self.started_at = now()
        self.phase = "Pending"
        self.grace = min(float(pod.spec.termination_grace_period_seconds or 30), agent.max_grace)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def stop(self, finalize: bool) -> None:
        self.finalize = self.finalize or finalize
        if self.stopped.is_set():
            return
        self.stopped.set()
        threading.Thread(target=self._kill_all, daemon=True).start()

    def _kill_all(self) -> None:
        with self.lock:
            live = {n: p for n, p in self.procs.items() if p.poll() is None}  # an exited one's PID may be reused
        procs = list(live.values())
        if self.agent.podman:  # podman stop: SIGTERM to the container, SIGKILL after the grace period
            stoppers = [threading.Thread(target=self.agent.podman.stop, args=(self.container_name(n), self.grace))
                        for n in live]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join(self.grace + 30)
        for p in procs:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p.pid, signal.SIGKILL)
        self.join(self.grace + 5)
        if self.finalize:
            self.agent.finalize_delete(self.pod)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # report instead of leaving the pod Pending forever
            log(f"pod {self.ns}/{self.name}: {type(e).__name__}: {e}")
            if not self.stopped.is_set():
                self.report("Failed", reason="NodeAgentError", message=str(e)[-1000:])

    def _run(self) -> None:
        spec = self.pod.spec
        for c in spec.init_containers or []:
            self.init_statuses[c.name] = _waiting(c, "PodInitializing")
        for c in spec.containers:
            self.statuses[c.name] = _waiting(c, "PodInitializing" if spec.init_containers else "ContainerCreating")
        self.dir.mkdir(parents=True, exist_ok=True)
        pulls = 0
        while True:  # resolve configuration; a missing Secret/ConfigMap or image is waited for, like the kubelet does
            try:
                prepared = {c.name: self.prepare(c) for c in [*(spec.init_containers or []), *spec.containers]}
                break
            except ConfigError as e:
                for c in spec.containers:
                    self.statuses[c.name] = _waiting(c, "CreateContainerConfigError", str(e))
                self.report("Pending")
                if self.stopped.wait(2):
                    return
            except ImageError as e:  # a kubelet alternates ErrImagePull and ImagePullBackOff, retrying forever
                reason = e.reason if e.reason not in PULL_ERRORS else PULL_ERRORS[pulls % 2]
                pulls += 1
                for c in spec.containers:
                    self.statuses[c.name] = _waiting(c, reason, str(e) if reason != "ImagePullBackOff" else
                                                     f'Back-off pulling image "{c.image}"')
                self.report("Pending")
                if self.stopped.wait(min(2 * pulls, 10)):
                    return
        self.report("Pending" if spec.init_containers else "Running")
        for c in spec.init_containers or []:
            code = self.run_container(c, prepared[c.name], self.init_statuses, restart="OnFailure"
                                      if spec.restart_policy != "Never" else "Never")
            if self.stopped.is_set():
                return
            if code != 0:
                self.report("Failed", reason="Init:Error")
                return
        if spec.init_containers:
            self.report("Running")
        results: dict[str, int] = {}
        threads = [threading.Thread(target=lambda c=c: results.__setitem__(
            c.name, self.run_container(c, prepared[c.name], self.statuses, spec.restart_policy or "Always")))
            for c in spec.containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.stopped.is_set():
            self.report("Succeeded" if all(v == 0 for v in results.values()) else "Failed")

    def container_name(self, container: str, restarts: int | None = None) -> str:
        """Unique per pod, container and attempt, like a kubelet's `k8s_<container>_<pod>_<ns>_<uid>_<attempt>`."""
        attempt = self.attempts.get(container, 0) if restarts is None else restarts
        return f"k8s_{container}_{self.name}_{self.ns}_{self.uid[:8]}_{attempt}"

    def container_pid(self, container: str, proc: subprocess.Popen, restarts: int) -> int:
        """Wait until podman has started the container; its first process's host PID (0 if it never ran)."""
        name = self.container_name(container, restarts)
        while proc.poll() is None:
            pid = self.agent.podman.pid(name)
            if pid:
                return pid
            time.sleep(0.2)
        return 0

    def run_container(self, c: client.V1Container, prepared: tuple, statuses: dict, restart: str) -> int:
        argv, env, cwd = prepared
        log_path, pid_path = self.dir / f"{c.name}.log", self.dir / f"{c.name}.pid"
        restarts, backoff, last = 0, 1.0, {}
        while True:
            started = now()
            with open(log_path, "ab") as out:
                try:
                    with self.lock:
                        if self.stopped.is_set():
                            return -1
                        self.attempts[c.name] = restarts
                        run = [self.container_name(c.name, restarts) if a == NAME_SLOT else a for a in argv]
                        proc = subprocess.Popen(run, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
                        self.procs[c.name] = proc
                except OSError as e:
                    out.write(f"node-agent: cannot start {argv[0]!r}: {e}\n".encode())
                    proc = None
            if proc is None:
                code, reason = 127, "ContainerCannotRun"
            else:
                pid = self.container_pid(c.name, proc, restarts) if self.agent.podman else proc.pid
                if pid:
                    pid_path.write_text(str(pid))
                    statuses[c.name] = {**_base_status(c, restarts, pid), **last, "ready": True,
                                        "started": True, "state": {"running": {"startedAt": started}}}
                    self.report(None)
                rc = proc.wait()
                pid_path.unlink(missing_ok=True)
                _killpg(proc.pid, signal.SIGKILL)  # the container's leftovers go with it
                code = rc if rc >= 0 else 128 - rc
                reason = "Completed" if code == 0 else "Error"
                if self.agent.podman and not pid and code:  # podman could not create or start it
                    code, reason = 128, "StartError"
            if self.stopped.is_set():
                return code
            statuses[c.name] = {**_base_status(c, restarts, proc.pid if proc else 0), **last, "state": {"terminated": {
                "exitCode": code, "reason": reason, "message": _tail(log_path), "startedAt": started,
                "finishedAt": now(), "containerID": f"local-process://{proc.pid if proc else 0}"}}}
            if restart == "Always" or (restart == "OnFailure" and code != 0):
                restarts += 1
                last = {"lastState": statuses[c.name]["state"]}
                statuses[c.name] = {**_base_status(c, restarts, 0), **last,
                                    "state": {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}}}
                self.report(None)
                if self.stopped.wait(backoff):
                    return code
                backoff = min(backoff * 2, 10)
                continue
            return code

    # -- configuration ---------------------------------------------------------------------------------------------
    def prepare(self, c: client.V1Container) -> tuple[list[str], dict[str, str], str]:
        if self.agent.podman:
            return self.prepare_container(c)
        mounts = self.mounts(c)
        env = self.resolve_env(c)
        env = {k: SERVICE_DNS.sub("127.0.0.1", _rewrite(v, mounts)) for k, v in env.items()}
        home, tmp = self.run_dir / "home", self.run_dir / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        in_volume = [str(d) for d in mounts.values()]
        for key, default in (("HOME", home), ("TMPDIR", tmp)):
            if not any(env.get(key, "").startswith(d) for d in in_volume):
                env[key] = str(default)
        if "/tmp" in mounts and "TMPDIR" not in (e.name for e in c.env or []):
            env["TMPDIR"] = str(mounts["/tmp"])
        env["PATH"] = ":".join([*self.agent.path_prepend, env.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        env.setdefault("HOSTNAME", self.name)
        token_kubeconfig = self.service_account_kubeconfig()
        if token_kubeconfig:
            env.setdefault("KUBECONFIG", str(token_kubeconfig))
        argv = [expand(a, env) for a in [*(c.command or []), *(c.args or [])]]
        if not c.command:
            raise RuntimeError(f"container {c.name}: the node stand-in cannot read image entrypoints; set `command`")
        argv = [SERVICE_DNS.sub("127.0.0.1", _rewrite(a, mounts)) for a in argv]
        argv[0] = self.resolve_program(argv[0], env["PATH"])
        cwd = str(REPO)
        if c.working_dir and _rewrite(c.working_dir, mounts) != c.working_dir:
            cwd = _rewrite(c.working_dir, mounts)
        return argv, env, cwd

    def prepare_container(self, c: client.V1Container) -> tuple[list[str], dict[str, str], str]:
        """The podman command line that runs container `c` (its name is filled in per attempt)."""
        podman = self.agent.podman
        podman.check_image(c)
        user, problems = podman.user(self.pod, c)
        if problems:
            raise ConfigError("; ".join(problems))
        mounts = [(target, local, read_only) for target, (local, read_only) in self.container_mounts(c).items()]
        env = {k: SERVICE_DNS.sub("127.0.0.1", v) for k, v in self.resolve_env(c, defaults=False).items()}
        token_dir = self.service_account_kubeconfig(container_dir=SA_DIR)
        if token_dir:
            mounts.append((SA_DIR, token_dir, True))
            env.setdefault("KUBECONFIG", f"{SA_DIR}/kubeconfig")
        env_file = self.run_dir / f"{c.name}.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in env.items() if "\n" not in v)
        # An env file holds one line a variable: a value that spans lines reaches podman through its own environment
        # (`--env NAME` copies it), never through the command line.
        multi_line = {k: v for k, v in env.items() if "\n" in v and k not in ("PATH", "HOME", "TMPDIR")}
        argv = podman.run_argv(self.pod, c, NAME_SLOT, env_file, mounts, user, inherit=sorted(multi_line))
        argv = [SERVICE_DNS.sub("127.0.0.1", expand(a, env)) for a in argv]
        return argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **multi_line}, str(self.run_dir)

    def container_mounts(self, c: client.V1Container) -> dict[str, tuple[Path, bool]]:
        """mountPath -> (local directory, read-only), owned as a kubelet leaves volumes for the pod's user."""
        psc = self.pod.spec.security_context or client.V1PodSecurityContext()
        volumes = {v.name: v for v in self.pod.spec.volumes or []}
        local = self.mounts(c)
        result = {}
        for m in c.volume_mounts or []:
            path = m.mount_path.rstrip("/") or "/"
            if path not in local:
                continue
            v = volumes[m.name]
            if v.empty_dir is not None or v.persistent_volume_claim is not None:
                own(local[path], psc.fs_group, 0o2777 if psc.fs_group is not None else 0o777)
            elif v.config_map is not None or v.secret is not None:
                source = v.config_map or v.secret
                mode = source.default_mode if source.default_mode is not None else 0o644
                for f in local[path].rglob("*"):
                    own(f, psc.fs_group, 0o755 if f.is_dir() else mode)
                own(local[path], psc.fs_group, 0o755)
            result[path] = (local[path], bool(m.read_only))
        return result

    def resolve_program(self, prog: str, path: str) -> str:
        base = os.path.basename(prog)
        if base in REMAPPED or ("/" in prog and not os.path.exists(prog)):
            found = shutil.which(base, path=path)
            if found:
                return found
        return prog

    def mounts(self, c: client.V1Container) -> dict[str, Path]:
        """mountPath -> local directory for every volume mount of the container."""
        volumes = {v.name: v for v in self.pod.spec.volumes or []}
        result = {}
        for m in c.volume_mounts or []:
            v = volumes.get(m.name)
            if v is None or m.mount_path.startswith("/var/run/secrets/kubernetes.io"):
                continue
            if v.host_path is not None:
                local = Path(v.host_path.path)
            elif v.persistent_volume_claim is not None:
                local = self.agent.state / "pvc" / self.ns / v.persistent_volume_claim.claim_name
            else:
                local = self.run_dir / "volumes" / m.name
                self.materialize(v, local)
            if m.sub_path:
                local = local / m.sub_path
            local.mkdir(parents=True, exist_ok=True)
            result[m.mount_path.rstrip("/") or "/"] = local
        return result

    def materialize(self, v: client.V1Volume, local: Path) -> None:
        local.mkdir(parents=True, exist_ok=True)
        data: dict[str, bytes] = {}
        items = None
        if v.config_map is not None:
            cm = self._get(self.agent.core.read_namespaced_config_map, v.config_map.name, v.config_map.optional)
            data = {k: s.encode() for k, s in ((cm and cm.data) or {}).items()}
            data.update({k: base64.b64decode(s) for k, s in ((cm and cm.binary_data) or {}).items()})
            items = v.config_map.items
        elif v.secret is not None:
            sec = self._get(self.agent.core.read_namespaced_secret, v.secret.secret_name, v.secret.optional)
            data = {k: base64.b64decode(s) for k, s in ((sec and sec.data) or {}).items()}
            items = v.secret.items
        paths = {i.key: i.path for i in items} if items else {k: k for k in data}
        for key, rel in paths.items():
            if key in data:
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                (local / rel).write_bytes(data[key])

    def _get(self, read, name: str, optional: bool | None):
        try:
            return read(name, self.ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            if e.status == 404:
                raise ConfigError(f"{read.__name__.split('_')[-1]} {name!r} not found") from None
            raise

    def resolve_env(self, c: client.V1Container, defaults: bool = True) -> dict[str, str]:
        """The container's environment; `defaults` adds what an image's ENV would (process mode has no image)."""
        core = self.agent.core
        host, port = urllib.parse.urlparse(self.agent.server).hostname, urllib.parse.urlparse(self.agent.server).port
        env = {"LANG": "C.UTF-8", **self.agent.base_env} if defaults else {}
        env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port or 443)})
        for src in c.env_from or []:
            if src.config_map_ref is not None:
                cm = self._get(core.read_namespaced_config_map, src.config_map_ref.name, src.config_map_ref.optional)
                values = (cm and cm.data) or {}
            else:
                sec = self._get(core.read_namespaced_secret, src.secret_ref.name, src.secret_ref.optional)
                values = {k: base64.b64decode(s).decode() for k, s in ((sec and sec.data) or {}).items()}
            env.update({(src.prefix or "") + k: s for k, s in values.items()})
        for e in c.env or []:
            if e.value_from is None:
                env[e.name] = expand(e.value or "", env)
                continue
            ref = e.value_from
            if ref.secret_key_ref is not None:
                r = ref.secret_key_ref
                sec = self._get(core.read_namespaced_secret, r.name, r.optional)
                raw = ((sec and sec.data) or {}).get(r.key)
                if raw is None and not r.optional:
                    raise ConfigError(f"couldn't find key {r.key} in Secret {self.ns}/{r.name}")
                if raw is not None:
                    env[e.name] = base64.b64decode(raw).decode()
            elif ref.config_map_key_ref is not None:
                r = ref.config_map_key_ref
                cm = self._get(core.read_namespaced_config_map, r.name, r.optional)
                raw = ((cm and cm.data) or {}).get(r.key)
                if raw is None and not r.optional:
                    raise ConfigError(f"couldn't find key {r.key} in ConfigMap {self.ns}/{r.name}")
                if raw is not None:
                    env[e.name] = raw
            elif ref.field_ref is not None:
                env[e.name] = self.field(ref.field_ref.field_path)
            elif ref.resource_field_ref is not None:
                env[e.name] = self.resource(c, ref.resource_field_ref)
        return env

    def field(self, path: str) -> str:
        meta = self.pod.metadata
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (getattr(meta, m.group(1)) or {}).get(m.group(2), "")
        return {"metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid,
                "spec.nodeName": self.pod.spec.node_name or "",
                "spec.serviceAccountName": self.pod.spec.service_account_name or "",
                "status.hostIP": "127.0.0.1", "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1"}[path]

    def resource(self, c: client.V1Container, ref: client.V1ResourceFieldSelector) -> str:
        kind, _, name = ref.resource.partition(".")
        res = c.resources or client.V1ResourceRequirements()
        q = ((res.limits if kind == "limits" else res.requests) or {}).get(name)
        if q is None:
            q = (res.limits or {}).get(name) if kind == "requests" else None
        if q is None:  # unset limit: the node's allocatable, as the kubelet reports
            node = self.agent.nodes[self.pod.spec.node_name]
            q = {"cpu": node.cpu, "memory": node.memory}.get(name, "0")
        return str(math.ceil(parse_quantity(q) / parse_quantity(ref.divisor or "1")))

    def service_account_kubeconfig(self, container_dir: str | None = None) -> Path | None:
        """A bound token for the pod's ServiceAccount, with the CA, namespace and a kubeconfig beside it; returns
        the kubeconfig, or with `container_dir` (where the folder is mounted in a container) the folder."""
        if self.pod.spec.automount_service_account_token is False:
            return None
        sa = self.pod.spec.service_account_name or "default"
        try:
            sa_obj = self.agent.core.read_namespaced_service_account(sa, self.ns)
            if sa_obj.automount_service_account_token is False and \
                    self.pod.spec.automount_service_account_token is not True:
                return None
            tr = self.agent.core.create_namespaced_service_account_token(sa, self.ns, {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "audiences": [], "expirationSeconds": 3600 * 6,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}})
        except ApiException as e:
            raise ConfigError(f"service account token for {sa}: {e.reason}") from None
        d = self.run_dir / "serviceaccount"
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(tr.status.token)
        (d / "namespace").write_text(self.ns)
        shutil.copy(self.agent.ca_file, d / "ca.crt")
        path = d / "kubeconfig"
        ca = f"{container_dir}/ca.crt" if container_dir else str(d / "ca.crt")
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "in-cluster",
            "clusters": [{"name": "in-cluster", "cluster": {"server": self.agent.server,
                                                            "certificate-authority": ca}}],
            "users": [{"name": sa, "user": {"token": tr.status.token}}],
            "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": sa,
                                                            "namespace": self.ns}}]}))
        if container_dir:  # readable by the container's user, as a kubelet's projected token (mode 0644)
            for f in (d, *d.iterdir()):
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
            return d
        return path

    # -- status ----------------------------------------------------------------------------------------------------
    def report(self, phase: str | None, reason: str | None = None, message: str | None = None) -> None:
        """Patch pods/status; phase None keeps the last phase (container-level change only)."""
        if phase is not None:
            self.phase = phase
        phase = self.phase
        done = phase in ("Succeeded", "Failed")
        running = phase == "Running" and all("running" in s.get("state", {}) for s in self.statuses.values())
        initialized = phase != "Pending" or not self.pod.spec.init_containers

        def cond(kind, ok, why=None):
            c = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                 "lastTransitionTime": now()}
            return {**c, "reason": why} if why else c

        why = "PodCompleted" if done else ("ContainersNotReady" if not running else None)
        status = {
            "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.started_at, "qosClass": (self.pod.status and self.pod.status.qos_class) or "BestEffort",
            "reason": reason, "message": message,
            "conditions": [cond("Initialized", initialized, "PodCompleted" if done else None),
                           cond("Ready", running, why), cond("ContainersReady", running, why),
                           cond("PodScheduled", True)],
            "containerStatuses": list(self.statuses.values()),
            "initContainerStatuses": list(self.init_statuses.values()) or None,
        }
        for attempt in range(5):
            try:
                # The uid makes the patch fail instead of touching a new pod that reuses the name.
                self.agent.core.patch_namespaced_pod_status(self.name, self.ns, {"metadata": {"uid": self.uid},
                                                                                 "status": status}, _content_type=MERGE)
                return
            except ApiException as e:
                if e.status in (404, 409):
                    return
                if e.status == 422:  # a new pod with this name (uid immutable) or a status the API refuses
                    log(f"status of {self.ns}/{self.name} refused: {e.body}")
                    return
                log(f"status of {self.ns}/{self.name} (attempt {attempt + 1}): {e.status} {e.reason}")
                time.sleep(0.5 * (attempt + 1))


def _base_status(c: client.V1Container, restarts: int, pid: int) -> dict:
    return {"name": c.name, "image": c.image or "", "imageID": f"local://{c.image or ''}", "ready": False,
            "restartCount": restarts, "started": False, **({"containerID": f"local-process://{pid}"} if pid else {})}


def _waiting(c: client.V1Container, reason: str, message: str | None = None) -> dict:
    return {**_base_status(c, 0, 0), "state": {"waiting": {"reason": reason, "message": message}}}


def _tail(path: Path, lines: int = 40, limit: int = 2048) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = b"".join(data.splitlines(keepends=True)[-lines:]).decode(errors="replace")
    return text[-limit:]


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    """Map a container path under a mount to the local directory (whole value, or the part after `=`)."""
    head, sep, tail = value.partition("=") if not value.startswith("/") else ("", "", value)
    for mount in sorted(mounts, key=len, reverse=True):
        if tail == mount or tail.startswith(mount.rstrip("/") + "/"):
            return head + sep + str(mounts[mount]) + tail[len(mount):]
    return value


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
