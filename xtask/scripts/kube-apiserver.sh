#!/usr/bin/env bash
# Builds a real kube-apiserver (and provides etcd) for the Kubernetes tests, once per machine.
#
# No kube-apiserver binary is packaged for Debian bookworm, but the `kubernetes` source package
# (1.20.2) builds offline. The steps are the ones DESIGN.md ("Verified toolchain facts")
# records; the vendored reflect2 1.0.1 crashes the server under Go 1.19, so the packaged 1.0.2
# replaces it. The result lives in $CACHE (default /var/cache/ai-enforcer/kube-1.20.2), outside
# any clone, so that CI on a fresh clone reuses it. Idempotent: exits at once when built.
set -euo pipefail
CACHE="${ENFORCER_KUBE_CACHE:-/var/cache/ai-enforcer/kube-1.20.2}"
if [[ -x "$CACHE/kube-apiserver" && -x /usr/bin/etcd ]]; then
    exit 0
fi
mkdir -p "$CACHE"
export DEBIAN_FRONTEND=noninteractive
src_list=/etc/apt/sources.list.d/ai-enforcer-src.sources
if [[ ! -f $src_list ]]; then
    cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi
apt-get install -y -qq golang-go etcd-server rsync jq dpkg-dev \
    golang-github-modern-go-reflect2-dev >/dev/null
if [[ -x "$CACHE/kube-apiserver" ]]; then
    exit 0
fi
work="$CACHE/build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
echo "kube-apiserver: fetching the kubernetes source package" >&2
apt-get source -qq kubernetes >/dev/null
tree="$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
[[ -n $tree ]] || { echo "kube-apiserver: no kubernetes-* source tree" >&2; exit 1; }
tree="$(cd "$tree" && pwd)"
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
cp -a /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
mkdir -p "$tree/.go/src/k8s.io"
ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
echo "kube-apiserver: building (8-20 minutes on 2 cores, once per machine)" >&2
cd "$tree/.go/src/k8s.io/kubernetes"
GOPATH="$tree/.go" GO111MODULE=off GOFLAGS=-mod=vendor GOCACHE="$CACHE/gocache" \
    make WHAT=cmd/kube-apiserver >"$CACHE/build.log" 2>&1 || {
    tail -n 40 "$CACHE/build.log" >&2
    exit 1
}
bin="$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1)"
[[ -n $bin ]] || { echo "kube-apiserver: build produced no binary" >&2; exit 1; }
install -m 0755 "$bin" "$CACHE/kube-apiserver.tmp"
mv "$CACHE/kube-apiserver.tmp" "$CACHE/kube-apiserver"
rm -rf "$work" "$CACHE/gocache"
echo "kube-apiserver: built into $CACHE" >&2
