"""A real Hugging Face Hub endpoint on 127.0.0.1 for the stage-in tests: `olah` (a hub mirror) in offline mode,
serving plain git repositories created here as hub repos.

    hub = start_hub(workdir)
    use_hub(hub, monkeypatch)                  # HF_ENDPOINT points at it, HF_HUB_DISABLE_XET=1
    sha = hub.add_repo("org/model", {"config.json": b"{}", "sub/w.bin": data})   # -> the commit
    sha2 = hub.add_repo("org/model", {...}, branch="dev")   # another commit on another branch
    hub.add_repo("org/set", {...}, repo_type="dataset")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

_GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def olah_binary() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "olah-cli")
    return beside if os.access(beside, os.X_OK) else shutil.which("olah-cli")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HubServer:
    workdir: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _git(self, repo: str, *args: str) -> str:
        env = {**os.environ, **_GIT_ENV}
        return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True,
                              env=env).stdout.strip()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
                 branch: str = "main", message: str = "add files") -> str:
        """Commit `files` (replacing the branch's tree) to `repo_id`; returns the full commit sha."""
        path = os.path.join(self.workdir, "mirrors", f"{repo_type}s", repo_id)
        if not os.path.isdir(os.path.join(path, ".git")):
            os.makedirs(path, exist_ok=True)
            self._git(path, "init", "-q", "-b", "main")
        if self._git(path, "branch", "--list", branch):
            self._git(path, "checkout", "-q", branch)
        else:
            self._git(path, "checkout", "-q", "-b", branch)
        for entry in os.listdir(path):
            if entry != ".git":
                full = os.path.join(path, entry)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        for rel, data in files.items():
            full = os.path.join(path, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
        self._git(path, "add", "-A")
        self._git(path, "commit", "-q", "--allow-empty", "-m", message)
        return self._git(path, "rev-parse", "HEAD")

    def start(self) -> None:
        config = os.path.join(self.workdir, "configs.toml")
        with open(config, "w") as f:
            f.write(f"""[basic]
host = "127.0.0.1"
port = {self.port}
repos-path = "{self.workdir}/repos"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{self.port}"
mirror-lfs-netloc = "127.0.0.1:{self.port}"
mirrors-path = ["{self.workdir}/mirrors"]
metadata-cache-ttl = 0

[accessibility]
offline = true
""")
        os.makedirs(os.path.join(self.workdir, "mirrors"), exist_ok=True)
        log = open(os.path.join(self.workdir, "olah.log"), "wb")
        self.proc = subprocess.Popen([olah_binary(), "-c", config], cwd=self.workdir, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited: {open(log.name, errors='replace').read()[-2000:]}")
            try:
                httpx.get(f"{self.endpoint}/api/models/none/none", timeout=2, trust_env=False)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("olah did not start within 60s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_hub(workdir: str) -> HubServer:
    """Start olah in `workdir`."""
    if not olah_binary():
        pytest.skip("olah-cli not found (pip install olah); the hub tests need a real hub endpoint")
    os.makedirs(workdir, exist_ok=True)
    hub = HubServer(workdir, _free_port())
    hub.start()
    return hub


def use_hub(hub: HubServer, monkeypatch) -> HubServer:
    """Point this test's environment (and huggingface_hub) at `hub`."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # The test session runs with HF_HUB_OFFLINE=1, read once when huggingface_hub is imported: these tests are
    # the ones that talk to a hub (the one on loopback).
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    return hub
