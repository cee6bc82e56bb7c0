# shellcheck shell=bash disable=SC2034,SC2154
# (variables here are set for, or by, the scripts that source this file)
# Shared helpers of benches/run.sh and benches/profile.sh; source it after setting LOAD_CPU,
# PROXY_CPU, IDP_DELAY_MS, HIT_TOKENS and TOKEN_BYTES. Not meant to be run on its own.
#
# Every process started through `start` is recorded and stopped on exit (trap), whatever
# happens; scratch files live in $work, removed on exit unless BENCH_KEEP=1.

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Processes: every one started is recorded and stopped on exit, whatever happens.

PIDS=()
work="$(mktemp -d "${TMPDIR:-/tmp}/txp-bench.XXXXXX")"

stop_pid() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    log "scratch directory kept: $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CPU CMD...: starts CMD pinned to CPU in the background, stdout to $work/NAME.out
# (or to $START_OUT), stderr to $work/NAME.err; sets STARTED_PID.
start() {
  local name="$1" cpu="$2"
  shift 2
  taskset -c "$cpu" "$@" >"${START_OUT:-$work/$name.out}" 2>"$work/$name.err" &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# first_line NAME: waits (bounded) for the first stdout line of a started example.
first_line() {
  local f="$work/$1.out"
  for _ in $(seq 1 200); do
    if [ -s "$f" ] && [ "$(wc -l <"$f")" -ge 1 ]; then
      head -n1 "$f"
      return 0
    fi
    sleep 0.05
  done
  cat "$work/$1.err" >&2 || true
  die "$1 did not start"
}

# wait_http URL: waits (bounded) until URL answers 200.
wait_http() {
  for _ in $(seq 1 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = 200 ]; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

CLK_TCK="$(getconf CLK_TCK)"
# The direct case has no server under test: no CPU is measured for it (the backend's is).
NO_PID=none
# cpu_ticks PID: utime + stime of the whole process (all threads), in clock ticks.
cpu_ticks() {
  if [ "$1" = "$NO_PID" ]; then echo 0; return; fi
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
# cpu_delta PID BEFORE AFTER: ticks used, or -1 when there is no process to measure.
cpu_delta() { if [ "$1" = "$NO_PID" ]; then echo -1; else echo "$(($3 - $2))"; fi; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
idp_calls() { curl -sf "$ISSUER/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_calls"])'; }
# metric ADMIN NAME: the value of an unlabelled metric on the proxy's admin listener.
metric() {
  curl -sf "http://$1/metrics" | awk -v n="$2" '$1 == n {print $2; found=1} END {if (!found) print 0}'
}

# ---------------------------------------------------------------------------------------------
# Binaries.

# prepare_binaries: builds (unless BENCH_SKIP_BUILD=1) and copies the binaries into $work/bin;
# sets bin, PROXY, LOAD. BENCH_BUILD=debug takes the debug build instead of the release one.
prepare_binaries() {
  local profile="${BENCH_BUILD:-release}" flag=--release
  local bench_examples=(bench_backend bare_forwarder bench_idp bench_load bench_chaos)
  [ "$profile" = debug ] && flag=
  local dir="${CARGO_TARGET_DIR:-$repo/target}/$profile"
  if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    # Two steps: the proxy binary with the production feature set (as `cargo build --release`
    # and the Dockerfile build it), then the examples, whose dev-dependencies would otherwise
    # add features (e.g. tokio's test-util) to the proxy binary built in the same invocation.
    # Only the examples a bench runs: each is linked with the release profile's whole-program
    # LTO, minutes apiece.
    log "building $profile binaries"
    cargo build $flag --locked --bins
    cargo build $flag --locked "${bench_examples[@]/#/--example=}"
  fi
  # Private copies: target/ is shared, and a rebuild during the run must not swap a binary
  # between two measurements (or under the profiler's feet).
  mkdir -p "$work/bin/examples"
  for b in token-exchange-proxy "${bench_examples[@]/#/examples/}"; do
    [ -x "$dir/$b" ] \
      || die "missing $dir/$b (build with: cargo build $flag --locked --examples --bins)"
    cp "$dir/$b" "$work/bin/$b"
  done
  bin="$work/bin"
  PROXY="$bin/token-exchange-proxy"
  LOAD="$bin/examples/bench_load"
}

# ---------------------------------------------------------------------------------------------
# The fixed cast: backend and fake IdP on the load generator's core.

# start_cast: starts bench_backend and bench_idp, mints HIT_TOKENS tokens into $work/hit.txt,
# writes the client secret; sets BACKEND, BACKEND_PID, ISSUER.
start_cast() {
  start backend "$LOAD_CPU" "$bin/examples/bench_backend" --listen 127.0.0.1:0
  BACKEND_PID=$STARTED_PID
  BACKEND="$(first_line backend)"
  start idp "$LOAD_CPU" "$bin/examples/bench_idp" --listen 127.0.0.1:0 --delay-ms "$IDP_DELAY_MS" \
    --token-bytes "$TOKEN_BYTES"
  ISSUER="$(first_line idp)"
  log "backend http://$BACKEND, fake IdP $ISSUER (token endpoint delay ${IDP_DELAY_MS} ms, tokens of about $TOKEN_BYTES bytes)"
  mint "$work/hit.txt" "$HIT_TOKENS" hit
  echo "secret-for-the-benchmark" >"$work/client-secret"
  chmod 600 "$work/client-secret"
}

# mint FILE N TAG: N new ES256 client tokens.
mint() { curl -sf --max-time 120 "$ISSUER/mint?n=$2&tag=$3" -o "$1" || die "minting tokens failed"; }

# proxy_config FILE MODE PORT ADMIN_PORT [LOG_LEVEL] [EXTRA_YAML]: the proxy's YAML (defaults everywhere
# else, so the JSON access log is on).
proxy_config() {
  cat >"$1" <<EOF
listen: 127.0.0.1:$3
admin_listen: 127.0.0.1:$4
mode: $2
upstream:
  url: http://$BACKEND
inbound:
  issuer: $ISSUER
  audiences: [bench-api]
exchange:
  token_endpoint: $ISSUER/token
  client_id: txp-bench
  client_auth:
    method: client_secret_post
    secret_file: $work/client-secret
  audience: [bench-backend]
shutdown:
  drain_delay: 0s
  timeout: 2s
EOF
  if [ -n "${5:-}" ]; then
    printf 'log:\n  level: %s\n' "$5" >>"$1"
  fi
  if [ -n "${6:-}" ]; then
    printf '%s\n' "$6" >>"$1"
  fi
}

# start_two_profiles NAME: the exchange-mode, cache-hit proxy with two profiles
# (two_profiles_config); sets URL, ADMIN, SUT_PID.
start_two_profiles() {
  local port admin
  port="$(free_port)"
  admin="$(free_port)"
  two_profiles_config "$work/$1.yaml" "$port" "$admin"
  TOKIO_WORKER_THREADS=1 START_OUT=/dev/null start "$1" "$PROXY_CPU" "$PROXY" --config "$work/$1.yaml"
  SUT_PID=$STARTED_PID
  URL="http://127.0.0.1:$port/mcp"
  ADMIN="127.0.0.1:$admin"
  wait_http "http://$ADMIN/readyz" || die "$1 did not become ready"
}

# two_profiles_config FILE PORT ADMIN_PORT [PARTNER_ISSUER]: the exchange-mode config of
# proxy_config as two profiles (README "Several issuers"): first `partner`, then the fake
# IdP's. Without PARTNER_ISSUER, `partner` names an issuer no bench token carries (keys and
# IdP shared with the second, which only costs start-up fetches), so that every request is
# routed past it; with it, `partner` is that fake IdP's (a second bench_idp).
two_profiles_config() {
  {
    printf 'listen: 127.0.0.1:%s\nadmin_listen: 127.0.0.1:%s\nupstream:\n  url: http://%s\n' \
      "$2" "$3" "$BACKEND"
    printf 'shutdown:\n  drain_delay: 0s\n  timeout: 2s\nprofiles:\n'
    local name issuer idp
    for name in partner corp; do
      issuer="$ISSUER" idp="$ISSUER"
      if [ "$name" = partner ]; then
        issuer="${4:-http://127.0.0.1:1/partner}" idp="${4:-$ISSUER}"
      fi
      printf '  - name: %s\n' "$name"
      printf "    inbound: {issuer: '%s', jwks_uri: '%s/jwks', audiences: [bench-api]}\n" "$issuer" "$idp"
      printf '    exchange:\n      token_endpoint: %s/token\n      client_id: txp-bench\n' "$idp"
      printf '      client_auth: {method: client_secret_post, secret_file: %s/client-secret}\n' "$work"
      printf '      audience: [bench-backend]\n'
    done
  } >"$1"
}

# start_proxy NAME MODE [LOG_LEVEL] [EXTRA_YAML]: starts the proxy ($PROXY) on the proxy
# core; sets URL, ADMIN, SUT_PID.
start_proxy() {
  local port admin
  port="$(free_port)"
  admin="$(free_port)"
  proxy_config "$work/$1.yaml" "$2" "$port" "$admin" "${3:-}" "${4:-}"
  # The proxy logs to stdout (one JSON line per request): to /dev/null, as cheap a sink as
  # there is, unless BENCH_PROXY_LOG=1 keeps it (a file costs far more per line than the
  # proxy's own logging does).
  local out=/dev/null
  [ "${BENCH_PROXY_LOG:-0}" = 1 ] && out="$work/$1.out"
  TOKIO_WORKER_THREADS=1 START_OUT="$out" start "$1" "$PROXY_CPU" "$PROXY" --config "$work/$1.yaml"
  SUT_PID=$STARTED_PID
  URL="http://127.0.0.1:$port/mcp"
  ADMIN="127.0.0.1:$admin"
  if ! wait_http "http://$ADMIN/readyz"; then
    tail -n 20 "$work/$1.err" >&2 || true
    die "$1 did not become ready (rerun with BENCH_PROXY_LOG=1 BENCH_KEEP=1 to keep its log)"
  fi
}
