"""A real MLflow tracking server on loopback for tests (`mlflow server` from its own venv, `make mlflow-server`:
full mlflow pins a pyarrow the runtime stack does not take), with a SQLite store and proxied artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def mlflow_binary() -> str | None:
    for candidate in (os.environ.get("MYSPROJ_MLFLOW_SERVER"), str(REPO / ".tools" / "mlflow" / "bin" / "mlflow"),
                      shutil.which("mlflow")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class MlflowServer:
    def __init__(self, binary: str, workdir: str, port: int):
        self.binary, self.workdir, self.port = binary, workdir, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        log = open(os.path.join(self.workdir, "server.log"), "ab")  # noqa: SIM115 - the server's, closed with it
        cmd = [self.binary, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.workdir}/mlflow.db",
               "--artifacts-destination", os.path.join(self.workdir, "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return Path(self.workdir, "server.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server and every worker it started (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
