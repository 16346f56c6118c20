#!/usr/bin/env bash
# Shared set-up for scripts/up.sh and scripts/test.sh: a virtualenv with the package, and the
# system tools the bus needs (Mosquitto and its clients; jq and openssl for the shell examples;
# for the tests, nats-server and PostgreSQL's server binaries).
# Source it: set `setup_extra=dev` first for the development tools (the caller's own
# arguments must not reach this file: `. file` passes them on).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPSBAY_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# For the tests only: nats-server (tests/nats.py starts a cluster) and PostgreSQL's server
# binaries (tests/pg.py starts its own server with them). Trying the bus needs neither.
if [ "${setup_extra:-}" = dev ]; then
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    && ! command -v initdb >/dev/null 2>&1; then
    need_apt+=(postgresql)
  fi
fi
if ! "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "opsbay: need Python 3.11 or newer with venv (Debian: apt-get install python3-venv)" >&2
  exit 1
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else
    echo "opsbay: missing ${need_apt[*]}; install with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  echo "opsbay: installing ${need_apt[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

extra="${setup_extra:-}"
stamp="$venv/.opsbay-installed${extra:+-$extra}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "opsbay: installing the package into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e "$root${extra:+[$extra]}"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
