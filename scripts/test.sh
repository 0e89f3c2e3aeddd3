#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh --test) and runs the whole suite.
# The tests start their own servers (Prefect, registries, moto) on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Two workers, a test file each at a time (--dist loadfile): the tests mostly wait on the
# processes they start, so two halve the wall time on a 2-CPU machine (13 min -> 7 min).
exec .venv/bin/python -m pytest -n "${CRFLOW_TEST_WORKERS:-2}" --dist loadfile "$@"
