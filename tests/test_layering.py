"""The layering, executable: the import contracts in pyproject.toml (layers, no ML stack below the faces, no cycle;
`make lint` runs them too), the torch-free start of every face and of the stages the CPU image runs, and a reason
beside every import left inside a function."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "transformers", "open_clip", "safetensors", "accelerate", "peft", "deepspeed", "tensorboard",
            "wandb")
# What starts without torch: the CLI (argument parsing and every command's module), the Job entry points, the
# controller, `mysproj status`/`logs`/`reproduce`, the pipeline, and the stages of the CPU image (no torch there).
TORCH_FREE = ("mysproj.cli", "mysproj.process", "mysproj.kube.entry", "mysproj.kube.controller", "mysproj.kube.table",
              "mysproj.kube.progress", "mysproj.kube.bucket", "mysproj.kube.watch", "mysproj.kube.logs",
              "mysproj.commands.status", "mysproj.commands.reproduce", "mysproj.commands.ask",
              "mysproj.commands.show_example", "mysproj.config.registry", "mysproj.kube.values_schema",
              "mysproj.pipeline.local", "mysproj.pipeline.command", "mysproj.pipeline.stage_process",
              "mysproj.stages.prep", "mysproj.stages.report", "mysproj.stages.fetch", "mysproj.bench.pipeline")


def test_the_import_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:]


def test_the_faces_and_the_cpu_stages_start_without_the_ml_stack():
    code = (f"import importlib, sys\nfor m in {TORCH_FREE!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {ML_STACK!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_import_inside_a_function_says_why():
    """ruff's PLC0415 refuses imports inside functions; the few that stay say why beside their noqa."""
    bare = []
    for path in sorted([*REPO.glob("mysproj/**/*.py"), *REPO.glob("jobs/*.py"), *REPO.glob("images/*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "noqa: PLC0415" in line and not re.search(r"noqa: PLC0415 - \S", line):
                bare.append(f"{path.relative_to(REPO)}:{n}")
    assert not bare, bare
