#!/usr/bin/env bash
# Set up a development environment from a fresh Debian/Ubuntu machine: the system tools the
# tests and benchmarks talk to, a virtualenv, and edgegw installed into it (C engine built).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v sftp >/dev/null || need_apt+=(openssh-client)
command -v /usr/sbin/sshd >/dev/null || need_apt+=(openssh-server)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v iperf3 >/dev/null || need_apt+=(iperf3)
command -v socat >/dev/null || need_apt+=(socat)
command -v psql >/dev/null || need_apt+=(postgresql-client)
command -v ss >/dev/null || need_apt+=(iproute2)
[ -f /usr/include/openssl/evp.h ] || need_apt+=(libssl-dev)   # the node's compiled chacha20
"$PY" -c "import ensurepip, venv" 2>/dev/null || need_apt+=(python3-venv python3-dev)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${need_apt[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "setup: please install: ${need_apt[*]} (benchmarks skip peers that are missing)" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c "import edgegw._relay" \
    || { echo "setup: the C relay engine did not build" >&2; exit 1; }
"$VENV/bin/python" -c "import internal.ssh._aead" \
    || { echo "setup: the node's compiled chacha20-poly1305 did not build (libssl-dev?)" >&2; exit 1; }
echo "setup: ready ($VENV)" >&2
