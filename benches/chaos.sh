#!/usr/bin/env bash
# IdP chaos (`make soak` runs it after benches/soak.sh; shortened in `make test`). README
# "Reliability".
#
# The proxy in exchange mode with its token endpoint behind examples/bench_chaos.rs's fault
# injector (latency up to 10 s, resets, half-open connections, truncated and garbage bodies,
# 5 s stalls mid-body), RATE requests/s in each phase, half with cached client tokens, half
# with new ones. See examples/bench_chaos.rs for what each fault does and what is checked.
#
# CHAOS_PROFILE=full (default: release build, 500 requests/s, 20 s per fault) or short
# (debug build, 100 requests/s, 5 s per fault). CHAOS_FAULTS=none,stall,... runs those phases only, in that order. Results in
# $SOAK_RESULTS_DIR (default: the scratch directory).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

PROFILE="${CHAOS_PROFILE:-full}"
# The short run's debug build spends far more CPU per request than the release build: 500
# requests/s of new tokens would measure the machine's cores, not the proxy's behaviour.
case "$PROFILE" in
  full) PHASE_SECS=20 DEFAULT_RATE=500 MEMORY=; : "${BENCH_BUILD:=release}" ;;
  # Phases of 5 s are too short to tell a leak from allocator drift: memory is reported only.
  short) PHASE_SECS=5 DEFAULT_RATE=100 MEMORY=--memory-report-only; : "${BENCH_BUILD:=debug}" ;;
  *) echo "CHAOS_PROFILE must be full or short" >&2; exit 2 ;;
esac
export BENCH_BUILD
RATE="${CHAOS_RATE:-$DEFAULT_RATE}"
ALL_CPUS="0-$(($(nproc) - 1))"
LOAD_CPU="$ALL_CPUS" PROXY_CPU="$ALL_CPUS" IDP_DELAY_MS=5 HIT_TOKENS=1 TOKEN_BYTES=1000
# shellcheck source=benches/lib.sh source-path=SCRIPTDIR/..
source "$repo/benches/lib.sh"
RESULTS_DIR="${SOAK_RESULTS_DIR:-$work}"
mkdir -p "$RESULTS_DIR"

prepare_binaries
start_cast
log "chaos ($PROFILE): $RATE requests/s, ${PHASE_SECS}s per fault"
status=0
"$bin/examples/bench_chaos" --proxy-bin "$PROXY" --idp "$ISSUER" --backend "$BACKEND" \
  --work "$work/chaos" --rate "$RATE" --phase-secs "$PHASE_SECS" ${MEMORY:+"$MEMORY"} \
  ${CHAOS_FAULTS:+--faults "$CHAOS_FAULTS"} \
  >"$RESULTS_DIR/chaos-$PROFILE.jsonl" || status=$?
python3 "$repo/benches/reliability.py" chaos "$RESULTS_DIR/chaos-$PROFILE.jsonl" \
  --summary "$RESULTS_DIR/chaos-$PROFILE.md" || status=1
exit "$status"
