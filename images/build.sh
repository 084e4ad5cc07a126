#!/usr/bin/env bash
# `make images`: builds the CPU and GPU images from the repository root with whichever builder works: docker (when
# its daemon answers), buildah, or podman. Prints one image name a line on stdout; progress, sizes and times go
# to stderr.
#   IMAGE_REGISTRY  prefix of the image names (default: none, e.g. ghcr.io/mysproj)
#   IMAGE_TAG       tag (default: the package version, which the chart's appVersion matches)
#   IMAGES          which to build (default: "cpu gpu")
#   IMAGE_BASE      auto (default): each Dockerfile's public base where the builder has it or can pull it, else the
#                   offline base; public; offline (images/base.sh: Debian via debootstrap, no registry needed); or
#                   an image name to build FROM
#   BUILD_ARGS      extra arguments for the builder
# Each image is labelled with its git revision (OCI labels). With buildah/podman, pip inside the build uses this
# machine's pip configuration (index, mirrors, local wheel folders, CA bundle), mounted read-only for the build
# only, and a pip cache shared between builds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# One build at a time on this machine: two builds of the same tag at once (`make test`'s two pytest sessions each
# make sure the images are there) would race on the tag.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/mysproj-images-build.lock"
    flock 9
fi
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' mysproj/__init__.py)
TAG=${IMAGE_TAG:-$VERSION}
PREFIX=${IMAGE_REGISTRY:+${IMAGE_REGISTRY%/}/}
read -r -a EXTRA <<<"${BUILD_ARGS:-}"
log() { echo "images: $*" >&2; }

REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$REVISION" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
    REVISION="$REVISION-dirty"
fi
LABELS=(--label "org.opencontainers.image.revision=$REVISION" --label "org.opencontainers.image.version=$VERSION")
LABELS+=(--build-arg "GIT_SHA=$REVISION")  # and as MYSPROJ_GIT_SHA inside: manifests and MLflow tags name it

# Lowered rlimits: podman's defaults raise them above what some hosts allow (then every RUN fails).
OCI_FLAGS=(--layers --isolation chroot --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
elif command -v buildah >/dev/null 2>&1; then
    ENGINE=buildah
elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
else
    log "neither a docker daemon nor buildah/podman is available (apt-get install buildah podman runc)"
    exit 1
fi
build() {  # build DOCKERFILE NAME ARGS...
    local file=$1 name=$2
    shift 2
    case "$ENGINE" in
        docker) DOCKER_BUILDKIT=1 docker build "$@" "${LABELS[@]}" "${EXTRA[@]}" -f "$file" -t "$name" . ;;
        buildah) buildah bud "${OCI_FLAGS[@]}" "${PIP_FLAGS[@]}" "$@" "${LABELS[@]}" "${EXTRA[@]}" -f "$file" -t "$name" . ;;
        podman) podman build "${OCI_FLAGS[@]}" "${PIP_FLAGS[@]}" "$@" "${LABELS[@]}" "${EXTRA[@]}" -f "$file" -t "$name" . ;;
    esac
}
have_image() {
    case "$ENGINE" in
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        *) "$ENGINE" inspect --type image "$1" >/dev/null 2>&1 ;;
    esac
}
image_size() {
    case "$ENGINE" in
        docker) echo "$(($(docker image inspect --format '{{.Size}}' "$1") / 1000000)) MB" ;;
        buildah) buildah images --noheading --format '{{.Size}}' "$1" ;;
        podman) echo "$(($(podman image inspect --format '{{.Size}}' "$1") / 1000000)) MB" ;;
    esac
}
pull() { "$ENGINE" pull -q "$1" >/dev/null 2>&1; }

# This machine's pip settings for the build: a pip.conf naming the same indexes and CA bundle, plus read-only mounts
# of the local folders they point at. Docker builds take no mounts: they use PyPI as a laptop would.
PIP_FLAGS=()
if [ "$ENGINE" != docker ] && command -v python3 >/dev/null; then
    PIP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mysproj-pip.XXXXXX")
    trap 'rm -rf "$PIP_DIR"' EXIT
    while IFS= read -r flag; do PIP_FLAGS+=("$flag"); done < <(python3 "$ROOT/images/pip_config.py" "$PIP_DIR")
fi

offline_base() {
    if [ -z "${OFFLINE_BASE:-}" ]; then
        OFFLINE_BASE=$(bash "$ROOT/images/base.sh")
    fi
    echo "$OFFLINE_BASE"
}

for kind in ${IMAGES:-cpu gpu}; do
    file="images/Dockerfile.$kind"
    image="${PREFIX}mysproj-${kind}:${TAG}"
    public=$(sed -n 's/^ARG BASE=//p' "$file")
    case "${IMAGE_BASE:-auto}" in
        public) base=$public ;;
        offline) base=$(offline_base) ;;
        auto) if have_image "$public" || pull "$public"; then base=$public; else base=$(offline_base); fi ;;
        *) base=$IMAGE_BASE ;;
    esac
    log "building $image from $file on $base ($ENGINE)"
    start=$SECONDS
    build "$file" "$image" --build-arg "BASE=$base" >&2
    log "$image: built in $((SECONDS - start)) s, $(image_size "$image")"
    echo "$image"
done
