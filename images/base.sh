#!/usr/bin/env bash
# The offline base image: Debian bookworm from Debian's own mirror with debootstrap, imported into the local
# container storage, for machines that reach no image registry (CI, air-gapped clusters). Both Dockerfiles build
# FROM it with `--build-arg BASE=<what this prints>`; the GPU image needs no CUDA base because PyPI's torch wheels
# carry the CUDA runtime libraries (the driver comes from the node).
#   IMAGE_CACHE   where the root filesystem tarball is kept between runs (default /var/cache/mysproj-images)
#   DEBIAN_MIRROR (default http://deb.debian.org/debian)
# Idempotent and cached: the tarball is built once per version of this script; a present image is reused.
# Prints the image name on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${IMAGE_CACHE:-/var/cache/mysproj-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What every stage needs from the distribution; everything else comes from PyPI into a venv.
PACKAGES=python3,python3-venv,ca-certificates
VERSION=$(sha256sum "$HERE/base.sh" | cut -c1-12)
NAME=localhost/mysproj-base:$SUITE-$VERSION
TARBALL=$CACHE/base-$SUITE-$VERSION.tar

log() { echo "[base] $*" >&2; }
engine() {
    if command -v podman >/dev/null 2>&1; then echo podman
    elif command -v buildah >/dev/null 2>&1; then echo buildah
    else log "neither podman nor buildah is installed (images/install-tools.sh)"; exit 1; fi
}
ENGINE=$(engine)

if "$ENGINE" inspect --type image "$NAME" >/dev/null 2>&1; then
    echo "$NAME"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.base.lock"
flock 9
if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing (images/install-tools.sh)"; exit 1; }
    start=$SECONDS
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/mysproj-base.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE ($PACKAGES) from $MIRROR"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # Lean: no package lists, caches, documentation or locales beyond C.UTF-8 in the base.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
    tar --numeric-owner -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    log "root filesystem built in $((SECONDS - start)) s -> $TARBALL ($(du -h "$TARBALL" | cut -f1))"
fi
log "importing $TARBALL as $NAME"
"$ENGINE" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$TARBALL" "$NAME" >/dev/null
echo "$NAME"
