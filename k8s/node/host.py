"""What a kubelet and containerd change on this machine outside their own folders, recorded before the node starts
and put back after it stopped: kernel settings, fixed paths, cgroups, network namespaces and mounts. Standard
library only.

The kubelet sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops and the root key quotas;
the CNI bridge plugin turns on net.ipv4.ip_forward. Both use a few fixed paths whatever their configuration says
(/var/log/pods, /var/lib/kubelet/device-plugins, /var/lib/cni, /run/containerd/{s,fifo,runc}, /run/netns/cni-*),
and the kubelet creates a `kubepods` cgroup in every hierarchy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward")
FIXED_PATHS = ("/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni", "/run/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS = Path("/run/netns")
CNI_RESULTS = Path("/var/lib/cni/results")
CNI_NETWORK = "mysproj-pods"  # the name in the node's CNI config (k8s/node/node.py)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def snapshot() -> dict:
    """What is there now, before the node starts."""
    return {
        "sysctls": {name: _read(Path("/proc/sys") / name) for name in SYSCTLS},
        "paths": [p for p in FIXED_PATHS if os.path.lexists(p)],
        "cgroups": [str(d) for d in CGROUP_ROOT.glob("*/kubepods*")],
        "netns": sorted(p.name for p in NETNS.glob("*")) if NETNS.is_dir() else [],
        "netns_dir": NETNS.is_dir(),
        "cni_results": sorted(p.name for p in CNI_RESULTS.glob("*")),
    }


def save(state: dict, path: Path) -> None:
    path.write_text(json.dumps(state, indent=1))


def mounts_under(*roots: str) -> list[str]:
    """Mount points at or below any of `roots`, deepest first (the order to unmount them in)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_all(*roots: str) -> None:
    for _ in range(3):  # a bind mount may be stacked on itself (the kubelet's root dir)
        points = mounts_under(*roots)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True)


def remove_cgroups(keep: list[str]) -> list[str]:
    """rmdir every kubepods cgroup the node created, leaves first; returns those that would not go."""
    left = []
    for top in CGROUP_ROOT.glob("*/kubepods*"):
        if str(top) in keep or not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            try:
                d.rmdir()
            except OSError:
                left.append(str(d))
    return left


def remove_cni_results(keep: list[str]) -> list[str]:
    """The CNI plugins' cached results of the node's sandboxes (in a folder other runtimes may share: only the
    node's network's entries and their sandboxes' loopback entries go)."""
    ours = {p.name[len(CNI_NETWORK) + 1:].rsplit("-", 1)[0] for p in CNI_RESULTS.glob(f"{CNI_NETWORK}-*")}
    problems = []
    for p in CNI_RESULTS.glob("*"):
        if p.name not in keep and any(p.name in (f"{CNI_NETWORK}-{i}-eth0", f"cni-loopback-{i}-lo") for i in ours):
            try:
                p.unlink()
            except OSError as e:
                problems.append(f"{p}: {e}")
    return problems


def leftovers(before: dict) -> list[str]:
    """What differs now from `before` in what the node may change (other runtimes' namespaces and results aside)."""
    now = snapshot()
    found = [f"sysctl {name} is {now['sysctls'][name]}, was {value}" for name, value in before["sysctls"].items()
             if value is not None and now["sysctls"][name] != value]
    found += [f"{p} left behind" for p in now["paths"] if p not in before["paths"]]
    found += [f"cgroup {c} left behind" for c in now["cgroups"] if c not in before["cgroups"]]
    found += [f"network namespace {n} left behind" for n in now["netns"]
              if n.startswith("cni-") and n not in before["netns"]]
    found += [f"{CNI_RESULTS / r} left behind" for r in now["cni_results"]
              if r.startswith(CNI_NETWORK) and r not in before.get("cni_results", [])]
    return found


def restore(before: dict) -> list[str]:
    """Put back what `snapshot()` saw (the node's processes must be gone); returns what could not be undone."""
    problems = []
    for name in sorted(p for p in (NETNS.glob("cni-*") if NETNS.is_dir() else []) if p.name not in before["netns"]):
        subprocess.run(["ip", "netns", "del", name.name], capture_output=True)
    unmount_all(*[p for p in FIXED_PATHS if p not in before["paths"]])
    problems += remove_cni_results(before.get("cni_results", []))
    problems += [f"cgroup {d} not removed" for d in remove_cgroups(before["cgroups"])]
    for path in FIXED_PATHS:
        if path not in before["paths"] and os.path.lexists(path):
            if mounts_under(path):
                problems.append(f"{path} still has mounts; left in place")
            else:
                shutil.rmtree(path, ignore_errors=True)
    if not before["netns_dir"] and NETNS.is_dir() and not any(NETNS.iterdir()):
        unmount_all(str(NETNS))
        shutil.rmtree(NETNS, ignore_errors=True)
    for name, value in before["sysctls"].items():
        path = Path("/proc/sys") / name
        if value is not None and _read(path) != value:
            try:
                path.write_text(value + "\n")
            except OSError as e:
                problems.append(f"sysctl {name}: {e}")
    return problems
