#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh --test) and runs the whole suite.
# The tests start their own servers (Prefect, registries, moto) on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
