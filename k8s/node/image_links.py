"""Images from the local podman storage into the node's containerd without copying their bytes.

`podman save | ctr images import` moves a multi-GB image three times (podman's tar, containerd's content store, the
unpacked snapshot): 6.4 min for the 6.8 GB GPU image on 2 busy cores. Both stores keep each layer as a plain
directory in overlayfs format (whiteouts are 0:0 character devices, opaque directories an xattr) on the same
filesystem, so each podman layer becomes a containerd `overlayfs` snapshot by hard-linking its files (`cp -al`:
seconds). Snapshots are named by their chain ID, which is what containerd's CRI plugin asks for when it creates a
container from the image. The image record itself is a small OCI archive (config + manifest, no layer blobs):
nothing pulls or unpacks these images again, and kubelet's image garbage collection is off.

Sharing inodes with podman is safe because overlayfs never writes to a lower layer (a container's changes go to
its own upper directory), and removing the node's snapshots only removes the links.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from collections.abc import Callable
from hashlib import sha256

SNAPSHOTTER = "overlayfs"
GC_ROOT = "containerd.io/gc.root"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain ID of each layer prefix (what a snapshot of layers 0..i is named)."""
    chains = [diff_ids[0]]
    for diff in diff_ids[1:]:
        chains.append("sha256:" + sha256(f"{chains[-1]} {diff}".encode()).hexdigest())
    return chains


def podman_layers(info: dict) -> list[str]:
    """The image's layer directories in podman's overlay storage, bottom first."""
    driver = info["GraphDriver"]
    if driver["Name"] != "overlay":
        raise RuntimeError(f"podman storage driver is {driver['Name']!r}; the node needs 'overlay'")
    data = driver["Data"]
    lower = data.get("LowerDir", "")
    dirs = [*reversed(lower.split(":") if lower else []), data["UpperDir"]]
    if len(dirs) != len(info["RootFS"]["Layers"]):
        raise RuntimeError(f"{len(dirs)} layer directories for {len(info['RootFS']['Layers'])} layers")
    return dirs


def oci_archive(name: str, info: dict) -> tuple[bytes, str]:
    """An OCI image layout naming `name`: index, manifest and config, no layer blobs. Returns (tar, config digest)."""
    diff_ids = info["RootFS"]["Layers"]
    config = json.dumps({"architecture": info.get("Architecture", "amd64"), "os": info.get("Os", "linux"),
                         "config": info.get("Config") or {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode()
    blobs = {"config": config}
    layer_size = max(int(info.get("Size", 0)) // max(len(diff_ids), 1), 1)  # what the kubelet reports; not used
    blobs["manifest"] = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _desc("application/vnd.oci.image.config.v1+json", config),
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": layer_size}
                   for d in diff_ids]}).encode()
    manifest = _desc("application/vnd.oci.image.manifest.v1+json", blobs["manifest"])
    manifest["annotations"] = {"io.containerd.image.name": name,
                               "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
             "index.json": json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode()}
    files.update({f"blobs/sha256/{sha256(b).hexdigest()}": b for b in blobs.values()})
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, data in files.items():
            entry = tarfile.TarInfo(path)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    return out.getvalue(), "sha256:" + sha256(config).hexdigest()


def _desc(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + sha256(data).hexdigest(), "size": len(data)}


def _snapshot_dir(mounts: list[dict]) -> str:
    """The directory an active snapshot writes to: a bind mount's source, or an overlay's upperdir."""
    m = mounts[0]  # ctr prints Go's field names
    if m["Type"] == "bind":
        return m["Source"]
    found = re.search(r"(?:^|,)upperdir=([^,]+)", ",".join(m.get("Options") or []))
    if not found:
        raise RuntimeError(f"unexpected snapshot mount {m}")
    return found.group(1)


def mount_point(path: str) -> str:
    """The mount point `path` lies on (the longest one above it)."""
    points = [line.split()[4] for line in open("/proc/self/mountinfo").read().splitlines()]
    return max((p for p in points if path == p or path.startswith(p.rstrip("/") + "/")), key=len)


# Podman bind-mounts its overlay folder onto itself, and link(2) refuses to cross mount points even within one
# filesystem. In a private mount namespace that self-bind is lazily unmounted first (the host's mounts are
# untouched); the folder found beneath it must be the very same directory (device and inode), else nothing is done.
_LINK_SCRIPT = """
before=$(stat -c %d:%i "$2") || exit 3
umount -l "$1" || exit 3
[ "$(stat -c %d:%i "$2")" = "$before" ] || { echo "$1 hides another directory" >&2; exit 3; }
exec cp -a --link --no-target-directory "$2" "$3"
"""


def hard_link_tree(src: str, dst: str) -> None:
    """`dst` (an empty directory) gets hard links to every file of `src` and copies of its directories (cp -a keeps
    owners, modes, times and xattrs: overlay's opaque marks)."""
    if mount_point(src) == mount_point(dst):
        argv = ["cp", "-a", "--link", "--no-target-directory", src, dst]
    else:
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _LINK_SCRIPT, "sh",
                mount_point(src), src, dst]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"hard-linking {src} into {dst} failed: {done.stderr[-2000:]}")


def link_image(ctr: Callable[..., subprocess.CompletedProcess], image: str) -> None:
    """Make podman's `image` an image of the node's containerd (namespace k8s.io) by hard links."""
    info = json.loads(subprocess.run(["podman", "image", "inspect", image], check=True, capture_output=True,
                                     text=True).stdout)[0]
    layers = podman_layers(info)
    chains = chain_ids(info["RootFS"]["Layers"])
    snap = ("snapshots", "--snapshotter", SNAPSHOTTER)
    parent = ""
    for layer, chain in zip(layers, chains):
        if ctr(*snap, "info", chain, capture_output=True).returncode != 0:  # shared with an earlier image
            key = f"mysproj-link-{chain}"
            ctr(*snap, "rm", key, capture_output=True)  # an earlier attempt's leftover
            prepared = ctr(*snap, "prepare", "--mounts", key, *([parent] if parent else []),
                           check=True, capture_output=True, text=True)
            target = _snapshot_dir(json.loads(prepared.stdout))
            hard_link_tree(layer, target)
            ctr(*snap, "commit", chain, key, check=True, capture_output=True)
            # A root for containerd's garbage collector until the image's config refers to it (below).
            ctr(*snap, "label", chain, f"{GC_ROOT}=linked", check=True, capture_output=True)
        parent = chain
    archive, config = oci_archive(image, info)
    ctr("images", "import", "--no-unpack", "-", input=archive, check=True, capture_output=True)
    ctr("content", "label", config, f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}={chains[-1]}",
        check=True, capture_output=True)
