"""TEST INFRASTRUCTURE: how the node stand-in (node_agent.py) runs one pod, as local processes or as podman containers,
and reports its status like a kubelet; pod_config.py resolves each container's environment, volumes and command line.
What is and isn't emulated: node_agent.py's docstring and k8s/README.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client
from kubernetes.client.rest import ApiException
from pod_config import NAME_SLOT, ConfigError, PodConfig
from pod_containers import PULL_ERRORS, ImageError

if TYPE_CHECKING:
    from node_agent import Agent

MERGE = "application/merge-patch+json"


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


class PodRunner(PodConfig, threading.Thread):
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
                # podman's own exit codes when it could not create the container or start its command (a container
                # may also run and exit before its PID was seen: its code is its own).
                if self.agent.podman and not pid and code in (125, 126, 127):
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


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
