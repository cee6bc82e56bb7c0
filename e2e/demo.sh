#!/usr/bin/env bash
# `make demo`: installs the peers if needed (idempotent), then runs e2e/demo.py.
# Environment: TXP_BIN (the proxy; default target/debug/token-exchange-proxy, relative to the
# repository root), TXP_E2E_PEERS (default .peers).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TXP_E2E_PEERS="${TXP_E2E_PEERS:-$repo/.peers}"
bash "$repo/scripts/e2e-setup.sh" || { echo "demo: peer installation failed" >&2; exit 1; }

bin="${TXP_BIN:-target/debug/token-exchange-proxy}"
case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
export TXP_BIN="$bin"

exec timeout -k 10 180 "$TXP_E2E_PEERS/runner/bin/python" "$repo/e2e/demo.py"
