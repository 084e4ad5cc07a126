"""This machine's pip settings, for pip inside an image build (images/build.sh, buildah/podman only).

Writes DIR/pip.conf with the indexes, local wheel folders, trusted hosts, proxy and timeout that `pip config list`
reports here (files and PIP_* variables), copies the CA bundle it names to DIR/ca.crt, and prints the builder flags,
one argument a line: DIR mounted read-only at /run/mysproj-build, every local folder those settings name mounted
read-only at its own path, and the build argument that points pip at the file. Nothing of it reaches an image
layer. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.parse

MOUNT = "/run/mysproj-build"
KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "proxy", "timeout", "default-timeout", "cert")


def settings() -> dict[str, str]:
    """key -> value; a PIP_* variable wins over the config files, as in pip."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(global|install|:env:)\.([a-z-]+)='(.*)'", line.strip())
        if m and m.group(2) in KEYS:
            rank = 1 if m.group(1) == ":env:" else 0
            if rank >= found.get(m.group(2), (-1, ""))[0]:
                found[m.group(2)] = (rank, m.group(3))
    return {k: v for k, (_, v) in found.items()}


def local_path(location: str) -> str | None:
    if location.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(location).path)
    return location if location.startswith("/") else None


def main(out_dir: str) -> int:
    conf = settings()
    mounts: set[str] = set()
    for key in ("index-url", "extra-index-url", "find-links"):
        for location in conf.get(key, "").split():
            path = local_path(location)
            if path and os.path.exists(path):
                # A simple index's pages link to files beside it (../../files/...): mount its parent.
                mounts.add(os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path)
    cert = conf.pop("cert", "")
    lines = ["[global]"] + [f"{k} = {v}" for k, v in sorted(conf.items())]
    if cert and os.path.isfile(cert):
        shutil.copyfile(cert, os.path.join(out_dir, "ca.crt"))
        lines.append(f"cert = {MOUNT}/ca.crt")
    with open(os.path.join(out_dir, "pip.conf"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(out_dir, 0o755)
    flags = ["-v", f"{out_dir}:{MOUNT}:ro"]
    for path in sorted(mounts):
        flags += ["-v", f"{path}:{path}:ro"]
    flags += ["--build-arg", f"PIP_CONFIG_FILE={MOUNT}/pip.conf"]
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
