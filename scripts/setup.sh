#!/usr/bin/env bash
# Installs what crflow needs on a Debian/Ubuntu machine: the registry binary and skopeo
# (apt), a virtualenv at .venv with crflow in it, and helm (crflow doctor --fix).
# Safe to rerun: it skips what is already there.  --test adds what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
command -v docker-registry >/dev/null || packages+=(docker-registry)
command -v skopeo >/dev/null || packages+=(skopeo)
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ -n "$extras" ]; then  # the fault tests' independent judges
  command -v curl >/dev/null || packages+=(curl)
  command -v openssl >/dev/null || packages+=(openssl)
  command -v containerd >/dev/null || packages+=(containerd)  # the emulated nodes' real runtime
  # The flow image: a Debian base (debootstrap), built by buildah and run by podman.
  for tool in debootstrap buildah podman; do command -v $tool >/dev/null || packages+=($tool); done
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> apt-get install ${packages[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "crflow needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || { echo "==> python3 -m venv .venv"; python3 -m venv .venv; }
echo "==> pip install -e .${extras}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"

# helm: the one on PATH if it is 3.8 or newer, else crflow fetches the pinned helm into its data
# folder (~/.local/share/crflow/bin), checking its sha256; doctor then checks what crflow needs.
echo "==> crflow doctor --fix"
.venv/bin/crflow doctor --fix
if [ -n "$extras" ] && [ ! -x .bin/helm3 ]; then
  echo "==> helm 3 into .bin/helm3 (the tests render the chart with helm 3 and 4)"
  .venv/bin/python -m crflow.helmbin .bin helm3
fi
if [ -n "$extras" ] && [ "$(id -u)" -eq 0 ]; then
  # The real Kubernetes node the tests run (tests/cluster.py): built once from Debian's source
  # package, about 13 minutes on 2 cores, then reused from the cache outside the checkout.
  echo "==> Kubernetes 1.20 binaries (scripts/build_cluster.sh; cached)"
  scripts/build_cluster.sh >/dev/null
fi
echo "==> ready: .venv/bin/crflow"
