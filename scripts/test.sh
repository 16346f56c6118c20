#!/usr/bin/env bash
# Lint, type-check and run the whole test suite. The suite starts its own Mosquitto on a free
# port. Extra arguments go to pytest (e.g. -k refusals).
set -euo pipefail
setup_extra=dev
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
ruff check opsbay_mqtt tests bench
ruff format --check opsbay_mqtt tests bench
mypy
lint-imports
exec pytest "$@"
