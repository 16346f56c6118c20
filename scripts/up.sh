#!/usr/bin/env bash
# Bring up the whole bus on this machine (Mosquitto on 127.0.0.1:1884, the coordinator, a
# worker for this host), run a demo job, and keep it up until Ctrl-C.
# Extra arguments go to `opsbay stack` (e.g. --port 1999, --once).
set -euo pipefail
setup_extra=""
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
exec opsbay stack "$@"
