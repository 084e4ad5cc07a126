#!/usr/bin/env bash
# Installs what building and running the images needs on a Debian 12 machine (called by `make images-test`):
# podman (runs containers, with runc: the default crun cannot set rlimits on some hosts), buildah (builds them),
# debootstrap (the offline base, images/base.sh) and iproute2 (the test pods' network namespace). Idempotent.
set -euo pipefail
PACKAGES=(podman buildah runc debootstrap iproute2)
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} = 0 ] && exit 0
echo "[images] apt-get install ${missing[*]}" >&2
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
