#!/usr/bin/env bash
# Installs the real third-party peers of the end-to-end suite (e2e/) into project-local,
# git-ignored directories, at pinned versions. Idempotent: a component whose lock file has not
# changed since it was installed is skipped, so a warm run takes a second or two.
#
#   .peers/idp        authgent-server (identity provider with RFC 8693 token exchange)
#   .peers/backend    official MCP Python SDK: Backend A (e2e/backend_a.py), e2e/client_py.py
#   .peers/nextcloud  nextcloud-mcp-server (Backend B)
#   .peers/runner     pytest and the harness' own dependencies
#   e2e/ts-client/node_modules   official MCP TypeScript SDK (npm ci from package-lock.json)
#
# Environment: TXP_E2E_PEERS (default: <repo>/.peers), PYTHON (default: python3), NPM (default: npm).
# The first install downloads ~150 MB and takes a few minutes.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="${TXP_E2E_PEERS:-$repo/.peers}"
python="${PYTHON:-python3}"
npm="${NPM:-npm}"
req="$repo/e2e/requirements"
ts="$repo/e2e/ts-client"

log() { printf 'e2e-setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v "$python" >/dev/null || die "$python not found (Python >= 3.10 is needed)"
"$python" - <<'EOF' || die "Python >= 3.10 is needed"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
command -v node >/dev/null || die "node not found (Node.js >= 20 is needed for the TypeScript client)"
command -v "$npm" >/dev/null || die "npm not found"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "Node.js >= 20 is needed, found $(node --version)"

if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing python3-venv"
    apt-get install -y --no-install-recommends python3-venv >/dev/null
  else
    die "the Python venv module is missing (Debian: apt-get install python3-venv)"
  fi
fi

mkdir -p "$peers"
# One setup at a time (two test runs started together must not install into one venv at once).
exec 9>"$peers/.setup.lock"
if command -v flock >/dev/null; then
  flock -w 900 9 || die "timed out waiting for another e2e-setup to finish"
fi

pyver="$("$python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"

# install_venv NAME: .peers/NAME from e2e/requirements/NAME.txt
install_venv() {
  local name="$1" lock="$req/$1.txt" dir="$peers/$1"
  [ -f "$lock" ] || die "missing $lock"
  local want
  want="$(sha256sum "$lock" | cut -d' ' -f1) python-$pyver"
  if [ -x "$dir/bin/python" ] && [ -f "$dir/.e2e-stamp" ] && [ "$(cat "$dir/.e2e-stamp")" = "$want" ]; then
    log "$name: up to date"
    return 0
  fi
  log "$name: installing into ${dir#"$repo"/} (first time: this can take a few minutes)"
  local start=$SECONDS
  rm -rf "$dir"
  "$python" -m venv "$dir"
  nice -n 10 "$dir/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$lock" \
    || die "$name: pip install failed"
  echo "$want" >"$dir/.e2e-stamp"
  log "$name: installed in $((SECONDS - start))s"
}

install_venv idp
install_venv backend
install_venv nextcloud
install_venv runner

# The TypeScript SDK client: npm ci from the committed package-lock.json.
want_ts="$(cat "$ts/package.json" "$ts/package-lock.json" | sha256sum | cut -d' ' -f1) node-$(node --version)"
if [ -f "$ts/node_modules/.e2e-stamp" ] && [ "$(cat "$ts/node_modules/.e2e-stamp")" = "$want_ts" ]; then
  log "ts-client: up to date"
else
  log "ts-client: npm ci"
  start=$SECONDS
  (cd "$ts" && nice -n 10 "$npm" ci --no-audit --no-fund --loglevel=error >/dev/null) || die "ts-client: npm ci failed"
  echo "$want_ts" >"$ts/node_modules/.e2e-stamp"
  log "ts-client: installed in $((SECONDS - start))s"
fi

# Smoke check: every entry point the suite starts is there.
for exe in "$peers/idp/bin/authgent-server" "$peers/nextcloud/bin/nextcloud-mcp-server" "$peers/runner/bin/pytest"; do
  [ -x "$exe" ] || die "missing $exe after install"
done
"$peers/backend/bin/python" -c 'import mcp.server.fastmcp, mcp.client.streamable_http, jwt' \
  || die "backend venv is broken"
[ -f "$ts/node_modules/@modelcontextprotocol/sdk/package.json" ] || die "ts-client: SDK missing after npm ci"
log "peers ready in ${peers#"$repo"/}"
