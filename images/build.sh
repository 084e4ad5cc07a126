#!/usr/bin/env bash
# `make images`: builds the CPU and GPU images from the repository root with docker (when its daemon answers) or
# buildah (daemonless), whichever is present.
#   IMAGE_REGISTRY  prefix of the image names (default: none, e.g. ghcr.io/mysproj)
#   IMAGE_TAG       tag (default: the package version)
#   IMAGES          which to build (default: "cpu gpu")
#   BUILD_ARGS      extra arguments for the builder (e.g. "--pull=never" with a locally imported base)
# Then set images.cpu/gpu.repository and tag in the chart's values to what this prints.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TAG=${IMAGE_TAG:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' mysproj/__init__.py)}
PREFIX=${IMAGE_REGISTRY:+${IMAGE_REGISTRY%/}/}
read -r -a EXTRA <<<"${BUILD_ARGS:-}"

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    build() { docker build "${EXTRA[@]}" -f "$1" -t "$2" .; }
elif command -v buildah >/dev/null 2>&1; then
    build() { buildah bud "${EXTRA[@]}" --layers -f "$1" -t "$2" .; }
else
    echo "images: neither a docker daemon nor buildah is available (apt-get install buildah)" >&2
    exit 1
fi

for kind in ${IMAGES:-cpu gpu}; do
    image="${PREFIX}mysproj-${kind}:${TAG}"
    echo "images: building $image from images/Dockerfile.$kind" >&2
    build "images/Dockerfile.$kind" "$image"
    echo "$image"
done
