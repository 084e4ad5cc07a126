"""TEST INFRASTRUCTURE: what the node stand-in resolves for each container of a pod before it runs it: environment
(env, envFrom, Secrets, ConfigMaps, field and resource references, the ServiceAccount token), volumes, and the
command line, as a local process (process mode) or as `podman run` (container mode, pod_containers.py)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import urllib.parse
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils.quantity import parse_quantity
from pod_containers import SA_DIR, own

REPO = Path(__file__).resolve().parents[2]
NAME_SLOT = "<container name>"  # replaced by each attempt's container name in a podman command line
REMAPPED = {"python", "python3", "python3.11", "mysproj", "torchrun", "deepspeed", "pip"}
# Every pod is 127.0.0.1, so a Service DNS name (e.g. the headless Service giving FT rank 0 a name) resolves there.
SERVICE_DNS = re.compile(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b\.?")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, anything else stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class ConfigError(Exception):
    """The pod's configuration cannot be resolved yet (a missing Secret/ConfigMap): CreateContainerConfigError."""


class PodConfig:
    """Mixed into PodRunner: needs `agent`, `pod`, `ns`, `name`, `uid` and `run_dir`."""

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
            if ref.secret_key_ref is not None or ref.config_map_key_ref is not None:
                secret = ref.secret_key_ref is not None
                r = ref.secret_key_ref if secret else ref.config_map_key_ref
                found = self._get(core.read_namespaced_secret if secret else core.read_namespaced_config_map,
                                  r.name, r.optional)
                raw = ((found and found.data) or {}).get(r.key)
                if raw is None and not r.optional:
                    raise ConfigError(f"couldn't find key {r.key} in {'Secret' if secret else 'ConfigMap'} "
                                      f"{self.ns}/{r.name}")
                if raw is not None:
                    env[e.name] = base64.b64decode(raw).decode() if secret else raw
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


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    """Map a container path under a mount to the local directory (whole value, or the part after `=`)."""
    head, sep, tail = value.partition("=") if not value.startswith("/") else ("", "", value)
    for mount in sorted(mounts, key=len, reverse=True):
        if tail == mount or tail.startswith(mount.rstrip("/") + "/"):
            return head + sep + str(mounts[mount]) + tail[len(mount):]
    return value
