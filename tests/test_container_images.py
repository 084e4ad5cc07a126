"""The images themselves, run as a cluster runs them: the GPU image, non-root, read-only, without any network,
prepares data, writes a tiny model and fine-tunes it a few steps, writing only to its mounted volumes (HOME, TMPDIR
and every cache from the image's ENV point below /scratch). The images carry their git revision and no compiler
but the C compiler Triton needs on GPUs (no nvcc); the CPU image has no torch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc", "--events-backend", "file"]
# What the chart's pods get: a non-root user, no capabilities, no privilege escalation, a read-only root.
HARDENED = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", "--read-only", "--read-only-tmpfs=false",
            "--user", "10001:10001", "--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def podman_run(image: str, *cmd: str, volumes: dict[str, Path] = (), timeout: float = 600):
    mounts = [a for target, local in dict(volumes).items() for a in ("--volume", f"{local}:{target}:rw")]
    return subprocess.run([*PODMAN, "run", "--rm", "--pull", "never", *HARDENED, *mounts, image, *cmd],
                          capture_output=True, text=True, timeout=timeout)


def writable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


@pytest.mark.timeout(900)
def test_gpu_image_prepares_inits_and_finetunes_offline_read_only_non_root(container_images, tmp_path):
    work, scratch, tmp = (writable(tmp_path / d) for d in ("work", "scratch", "tmp"))
    script = ("mysproj prep --dataset textures-mini --out /work/data --max-per-class 4 --patch-size 64 "
              "&& mysproj model init --preset tiny --out /work/model "
              "&& mysproj finetune --strategy projector --model /work/model --data /work/data --out /work/ft "
              "--max-steps 2 --global-batch 4 --per-device-batch 2 --workers 0")
    result = podman_run(container_images["gpu"], "sh", "-c", script,
                        volumes={"/work": work, "/scratch": scratch, "/tmp": tmp})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for stage in ("data", "model", "ft"):
        assert (work / stage / "_SUCCESS.json").exists(), stage
    assert json.loads((work / "ft" / "_SUCCESS.json").read_text())["stage"] == "finetune"
    # The caches went where the image's ENV points: the scratch volume, created on first use.
    assert (scratch / "home").is_dir() and (scratch / "cache" / "matplotlib").is_dir()


def test_gpu_image_runs_without_nvcc_and_keeps_what_triton_needs(container_images):
    check = ("import shutil, os, sysconfig, deepspeed, torch; from triton.runtime import build; "
             "print('nvcc', shutil.which('nvcc')); print('cc', build._find_compiler('c')); "
             "print('Python.h', os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))); "
             "print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)")
    result = podman_run(container_images["gpu"], "python", "-c", check, volumes={})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nvcc None" in result.stdout and "cc /usr/bin/gcc" in result.stdout, result.stdout
    assert "Python.h True" in result.stdout and "torch 2.14.1" in result.stdout, result.stdout


def test_cpu_image_is_slim_and_images_carry_their_revision(container_images):
    result = podman_run(container_images["cpu"], "python", "-c",
                        "import importlib.util as u; print([m for m in ('torch', 'kubernetes', 's3fs') "
                        "if u.find_spec(m)]); import shutil; print('cc', shutil.which('gcc') or shutil.which('cc'))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['kubernetes', 's3fs']" in result.stdout and "cc None" in result.stdout, result.stdout
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    for image in container_images.values():
        labels = json.loads(subprocess.run([*PODMAN, "image", "inspect", "--format", "{{json .Labels}}", image],
                                           capture_output=True, text=True, check=True).stdout)
        assert labels["org.opencontainers.image.revision"].removesuffix("-dirty") == head, labels
        assert labels["org.opencontainers.image.version"] == "0.1.0"


def test_help_is_the_default_command_and_a_missing_scratch_volume_is_one_line(container_images, tmp_path):
    result = subprocess.run([*PODMAN, "run", "--rm", "--pull", "never", *HARDENED, container_images["cpu"]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: mysproj"), result.stderr[-2000:]
    # No volume at /scratch: HOME and the caches would be on the read-only root.
    result = podman_run(container_images["cpu"], "mysproj", "prep", "--dataset", "textures-mini", "--out",
                        "/work/data", volumes={"/work": writable(tmp_path / "work")})
    assert result.returncode == 64 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: stage prep: /scratch/home is on the read-only root file system; point HOME, TMPDIR and the cache "
        "variables below a writable volume (the chart's stages.scratchDir)"]
