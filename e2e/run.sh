#!/usr/bin/env bash
# The end-to-end suite against real peers: installs them (idempotent), then runs pytest.
#   bash e2e/run.sh [pytest args...]       e.g. bash e2e/run.sh -k passthrough -x
# Environment: TXP_BIN (the proxy; default target/debug/token-exchange-proxy, relative to the
# repository root), TXP_E2E_PEERS (where peers are installed; default .peers),
# TXP_E2E_WORKDIR (keep logs and configs there instead of a temporary directory).
# Exits with pytest's exit code.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="${TXP_E2E_PEERS:-$repo/.peers}"
export TXP_E2E_PEERS="$peers"

bash "$repo/scripts/e2e-setup.sh" || { echo "e2e: peer installation failed" >&2; exit 1; }

bin="${TXP_BIN:-target/debug/token-exchange-proxy}"
case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
export TXP_BIN="$bin"
echo "e2e: proxy under test: $TXP_BIN" >&2

cd "$repo/e2e" || exit 1
# A hard bound on the whole run, on top of pytest-timeout's bound per test.
timeout -k 15 900 "$peers/runner/bin/python" -m pytest "$@"
rc=$?
[ "$rc" = 124 ] && echo "e2e: the suite exceeded 900 s and was stopped" >&2
exit "$rc"
