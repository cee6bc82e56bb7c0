#!/usr/bin/env bash
# Soak and drain under load (`make soak`; shortened in `make test`). README "Reliability".
#
# The proxy in exchange mode between the bench's fake IdP (examples/bench_idp.rs) and backend
# (examples/bench_backend.rs), everything on 127.0.0.1, driven by `bench_load soak`
# (examples/support/soak.rs):
#
#   1. soak   STREAMS event streams (an event every 100 ms) beside RATE tool-call POSTs/s over
#             TOKENS tokens for DURATION s, and CHURN hostile connections (whole requests,
#             resets mid-head and mid-stream, half-closes, slowloris heads); resident memory,
#             file descriptors and the connection gauge sampled every second.
#             Passes when: every POST is a 200 and no request failed; every stream got every
#             event, in order, with no silence over 1 s; resident memory grew less than 5 %
#             over the last 30 s of load and ended within 10 % of where it started once the
#             streams closed; file descriptors, open connections and runtime tasks back to
#             their baseline; every slowloris connection closed by the proxy.
#   2. drain  the same kind of load (endless streams), SIGTERM in the middle of it.
#             Passes when: no request sent before the listener closed failed; every stream
#             ended cleanly (whole events, in order) within shutdown.timeout; exit code 0;
#             one access line per response received, all 200.
#
# SOAK_PROFILE=full (default; release build, the sizes of README "Reliability") or short
# (debug build, a few minutes in all, for `make test`). Results: one JSON per run and a
# summary in $SOAK_RESULTS_DIR (default: the scratch directory; `make soak` sets
# benches/results). BENCH_SKIP_BUILD=1 and BENCH_KEEP=1 as for benches/run.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

PROFILE="${SOAK_PROFILE:-full}"
case "$PROFILE" in
  full)
    STREAMS=1000 EVENTS=600 RATE=2000 DURATION=60 CHURN=10000 SLOW_UNTIL_CLOSED=50
    DRAIN_STREAMS=200 DRAIN_DURATION=20 DRAIN_SIGTERM=8 DRAIN_DELAY=2 DRAIN_TIMEOUT=10
    : "${BENCH_BUILD:=release}"
    ;;
  short)
    STREAMS=100 EVENTS=150 RATE=300 DURATION=15 CHURN=1000 SLOW_UNTIL_CLOSED=0
    DRAIN_STREAMS=50 DRAIN_DURATION=8 DRAIN_SIGTERM=4 DRAIN_DELAY=1 DRAIN_TIMEOUT=5
    : "${BENCH_BUILD:=debug}"
    ;;
  *) echo "SOAK_PROFILE must be full or short" >&2; exit 2 ;;
esac
export BENCH_BUILD
TOKENS=200
# Keep-alive connections for the POSTs (more did not raise the rate here: the cores are the limit).
CONNECTIONS="${SOAK_CONNECTIONS:-64}"
GAP_MS=100
# benches/lib.sh's settings: no pinning (every process may use every core), a 5 ms IdP.
ALL_CPUS="0-$(($(nproc) - 1))"
LOAD_CPU="$ALL_CPUS" PROXY_CPU="$ALL_CPUS" IDP_DELAY_MS=5 HIT_TOKENS="$TOKENS" TOKEN_BYTES=1000
# shellcheck source=benches/lib.sh source-path=SCRIPTDIR/..
source "$repo/benches/lib.sh"
RESULTS_DIR="${SOAK_RESULTS_DIR:-$work}"
mkdir -p "$RESULTS_DIR"

for t in taskset curl python3; do
  command -v "$t" >/dev/null || die "$t not found"
done
prepare_binaries
start_cast

# run_proxy NAME DRAIN_DELAY TIMEOUT: the proxy on its own config, stdout (the access log) to
# $work/NAME.out; sets URL, ADMIN, SUT_PID, PORT.
run_proxy() {
  local port admin
  port="$(free_port)"
  admin="$(free_port)"
  proxy_config "$work/$1.yaml" exchange "$port" "$admin"
  sed -i "s/^  drain_delay: .*/  drain_delay: $2s/; s/^  timeout: 2s$/  timeout: $3s/" "$work/$1.yaml"
  start "$1" "$PROXY_CPU" "$PROXY" --config "$work/$1.yaml"
  SUT_PID=$STARTED_PID
  PORT=$port
  ADMIN="127.0.0.1:$admin"
  wait_http "http://$ADMIN/readyz" || { tail -n 20 "$work/$1.err" >&2; die "$1 did not become ready"; }
  "$LOAD" once --url "http://127.0.0.1:$port/mcp" --tokens "$work/hit.txt" --concurrency 16 \
    >"$work/$1-warm.json"
}

# ---------------------------------------------------------------------------------------------
# 1. Soak.

log "soak ($PROFILE): $STREAMS streams, $RATE POSTs/s for ${DURATION}s, $CHURN hostile connections"
run_proxy soak 0 2
"$LOAD" soak --proxy "127.0.0.1:$PORT" --admin "$ADMIN" --backend "$BACKEND" --pid "$SUT_PID" \
  --tokens "$work/hit.txt" --streams "$STREAMS" --events "$EVENTS" --gap-ms "$GAP_MS" \
  --rate "$RATE" --duration "$DURATION" --churn "$CHURN" --connections "$CONNECTIONS" \
  --slowloris-until-closed "$SLOW_UNTIL_CLOSED" >"$RESULTS_DIR/soak-$PROFILE.json"
stop_pid "$SUT_PID"

# ---------------------------------------------------------------------------------------------
# 2. Drain under load.

log "drain ($PROFILE): SIGTERM after ${DRAIN_SIGTERM}s of $DRAIN_STREAMS streams and $RATE POSTs/s"
run_proxy drain "$DRAIN_DELAY" "$DRAIN_TIMEOUT"
"$LOAD" soak --proxy "127.0.0.1:$PORT" --admin "$ADMIN" --pid "$SUT_PID" \
  --tokens "$work/hit.txt" --streams "$DRAIN_STREAMS" --events 0 --gap-ms "$GAP_MS" \
  --rate "$RATE" --duration "$DRAIN_DURATION" --churn 0 \
  --sigterm-after "$DRAIN_SIGTERM" --drain-delay "$DRAIN_DELAY" >"$RESULTS_DIR/drain-$PROFILE.json"
exit_code=0
for _ in $(seq 1 $(((DRAIN_DELAY + DRAIN_TIMEOUT + 10) * 10))); do
  kill -0 "$SUT_PID" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$SUT_PID" 2>/dev/null; then
  exit_code=still-running
  stop_pid "$SUT_PID"
else
  wait "$SUT_PID" || exit_code=$?
fi
# The access log (stdout) holds the warm-up's lines first: count those apart.
warm_lines="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"])' "$work/drain-warm.json")"

# ---------------------------------------------------------------------------------------------
# Verdict.

python3 "$repo/benches/reliability.py" soak "$RESULTS_DIR/soak-$PROFILE.json" \
  --drain "$RESULTS_DIR/drain-$PROFILE.json" --access-log "$work/drain.out" \
  --warm-lines "$warm_lines" --exit-code "$exit_code" --drain-delay "$DRAIN_DELAY" \
  --drain-timeout "$DRAIN_TIMEOUT" --drain-sigterm "$DRAIN_SIGTERM" \
  --summary "$RESULTS_DIR/soak-$PROFILE.md"
