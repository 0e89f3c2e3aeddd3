#!/usr/bin/env bash
# Builds the binaries of a single-node Kubernetes 1.20 from Debian bookworm's `kubernetes`
# source package (the only Debian suite that ships the whole upstream tree, vendor/ included):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, and
# the pause binary the node's sandboxes run. Once: they are kept in a cache outside the
# checkout, keyed by the source version, and reused (about 13 minutes cold on 2 cores).
#
#   scripts/build_cluster.sh            # prints the folder that holds the binaries
#
# The cache is $CRFLOW_CACHE (default /var/cache/crflow as root, else ~/.cache/crflow). Needs
# root for apt-get. Nothing is fetched but Debian packages, from the mirror this machine's apt
# sources already use.
set -euo pipefail

SOURCE_PACKAGE=kubernetes
SUITE=bookworm
GIT_VERSION=v1.20.2  # what the tree is (Debian's version says 1.20.5+really1.20.2)
if [ "$(id -u)" -eq 0 ]; then default_cache=/var/cache/crflow; else default_cache="$HOME/.cache/crflow"; fi
CACHE="${CRFLOW_CACHE:-$default_cache}"
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "==> $*" >&2; }

need=()
for pkg in rsync jq golang-1.19-go etcd-server golang-github-modern-go-reflect2-dev containerd runc \
           containernetworking-plugins conntrack iptables iproute2 dpkg-dev gcc libc6-dev busybox-static \
           openssl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The mirror this machine's apt already uses (never written into the repository).
mirror=$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null || true;
            grep -h '^deb ' /etc/apt/sources.list 2>/dev/null || true; } |
          awk '$1 == "URIs:" {print $2} $1 == "deb" {print ($2 ~ /^\[/ ? $3 : $2)}' | grep -v security | head -1 || true)
[ -n "$mirror" ] || { echo "build_cluster: no Debian mirror in this machine's apt sources" >&2; exit 1; }

apt_dir="$CACHE/apt"
mkdir -p "$apt_dir/lists/partial"
echo "deb-src $mirror $SUITE main" > "$apt_dir/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$apt_dir/lists" -o APT::Sandbox::User=root)
version=$(apt-cache "${apt_private[@]}" showsrc "$SOURCE_PACKAGE" 2>/dev/null | awk '/^Version:/ {print $2; exit}' || true)
if [ -z "$version" ]; then
  say "apt-get update (deb-src $SUITE, a private list)"
  apt-get "${apt_private[@]}" update -qq
  version=$(apt-cache "${apt_private[@]}" showsrc "$SOURCE_PACKAGE" | awk '/^Version:/ {print $2; exit}')
fi
out="$CACHE/kubernetes-$version"
if [ -f "$out/bin/.complete" ]; then
  echo "$out/bin"
  exit 0
fi

src="$CACHE/src-$version"
if [ ! -f "$src/.extracted" ]; then
  rm -rf "$src"
  mkdir -p "$src"
  say "apt-get source $SOURCE_PACKAGE=$version"
  (cd "$src" && apt-get "${apt_private[@]}" source --download-only "$SOURCE_PACKAGE=$version" >/dev/null &&
     dpkg-source --no-check -x ./*.dsc tree >/dev/null)
  touch "$src/.extracted"
fi
tree="$src/tree"

export PATH="/usr/lib/go-1.19/bin:$PATH" GOFLAGS=-mod=vendor GOCACHE="$CACHE/go-build" GOTMPDIR="$CACHE/tmp"
mkdir -p "$GOTMPDIR"
# Go 1.18 and later crash the apiserver with the vendored reflect2 1.0.1; Debian ships 1.0.2.
if [ ! -f "$tree/.reflect2" ]; then
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  touch "$tree/.reflect2"
fi
if [ ! -f "$tree/.generated" ]; then
  say "make generated_files (about 2 minutes)"
  (cd "$tree" && make generated_files >/dev/null)
  touch "$tree/.generated"
fi

gopath="$CACHE/gopath"
mkdir -p "$gopath/src/k8s.io"
ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
stamp="-X k8s.io/kubernetes/vendor/k8s.io/component-base/version"
client="-X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version"
ldflags="-s -w"
for pair in "gitVersion=$GIT_VERSION" gitMajor=1 gitMinor=20 "gitCommit=debian-$version" gitTreeState=clean \
            "buildDate=$(date -u -d @"$(stat -c %Y "$src/.extracted")" +%Y-%m-%dT%H:%M:%SZ)"; do
  ldflags="$ldflags $stamp.$pair $client.$pair"
done
mkdir -p "$out/bin"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  [ -x "$out/bin/$cmd" ] && continue
  say "go build $cmd"
  (cd "$gopath/src/k8s.io/kubernetes" &&
     GOPATH="$gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= \
       go build -o "$out/bin/$cmd.new" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$cmd") &&
    mv "$out/bin/$cmd.new" "$out/bin/$cmd"
done
[ -x "$out/bin/pause" ] || gcc -Os -static -o "$out/bin/pause" "$tree/build/pause/linux/pause.c"
"$out/bin/kube-apiserver" --version | grep -q "$GIT_VERSION"
touch "$out/bin/.complete"
echo "$out/bin"
