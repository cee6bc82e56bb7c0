#!/usr/bin/env bash
# What traces, a second profile or an earlier build cost on the cache-hit path, against the
# same proxy with none of them (README "Traces", "Performance"; run by `make bench` after
# run.sh with its default cases).
#
# Cases, side by side on the proxy core (one worker thread each), rounds interleaved:
#   off          exchange, cache hit, one profile, no `telemetry` section: the reference
#   before       the same config with BENCH_BEFORE_BIN, a proxy binary built from an earlier
#                commit (skipped when unset; BENCH_BEFORE_LABEL names it in the table), e.g.
#                  git worktree add /tmp/txp-before <commit> &&
#                  (cd /tmp/txp-before && cargo build --release --locked --bins)
#                  BENCH_BEFORE_BIN=/tmp/txp-before/target/release/token-exchange-proxy make bench
#   on_1.0       traces on, `telemetry.sample_ratio: 1.0`: every request exported (4 spans)
#   on_0.01      traces on, `sample_ratio: 0.01`
#   two_profiles two profiles, the tokens' issuer second (README "Several issuers"), traces off
#   again        a second proxy exactly like `off`: its ratio to `off` is what the method
#                itself gives for no difference at all, on this machine at this time
# BENCH_CASES picks them (default: off before on_1.0 on_0.01); `off` is always measured.
# With traces on, spans go to the fake IdP's `/v1/traces`, a sink on the load generator's core
# that accepts every batch (a collector that keeps up).
#
# For each: CPU time of the proxy per request (utime+stime from /proc/PID/stat, wrk closed
# loop, BENCH_REPS rounds of BENCH_DURATION s), and per round the ratio to `off`. Writes
# benches/results/telemetry.md and telemetry.json and prints the table.
#
# Knobs: those of run.sh (BENCH_DURATION, BENCH_REPS, BENCH_CONNECTIONS, BENCH_HIT_TOKENS,
# BENCH_TOKEN_BYTES, BENCH_LOAD_CPU, BENCH_PROXY_CPU, BENCH_SKIP_BUILD, BENCH_KEEP,
# BENCH_RESULTS_DIR), BENCH_CASES, BENCH_BEFORE_BIN and BENCH_BEFORE_LABEL.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

DURATION="${BENCH_DURATION:-10}"
REPS="${BENCH_REPS:-5}"
CONNS="${BENCH_CONNECTIONS:-50}"
HIT_TOKENS="${BENCH_HIT_TOKENS:-500}"
LOAD_CPU="${BENCH_LOAD_CPU:-0}"
PROXY_CPU="${BENCH_PROXY_CPU:-1}"
IDP_DELAY_MS=5
TOKEN_BYTES="${BENCH_TOKEN_BYTES:-1000}"
RESULTS_DIR="${BENCH_RESULTS_DIR:-$repo/benches/results}"
SOURCE_VERSION="$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
# shellcheck source=benches/lib.sh source-path=SCRIPTDIR/..
source "$repo/benches/lib.sh"

for t in taskset curl python3 awk getconf wrk; do
  command -v "$t" >/dev/null || die "$t not found (run benches/run.sh first: it installs wrk)"
done
CLK_TCK="$(getconf CLK_TCK)"
prepare_binaries
start_cast

read -r -a wanted <<<"${BENCH_CASES:-off before on_1.0 on_0.01}"
cases=(off)
declare -A URLS PIDS_OF ADMINS
start_proxy off exchange
URLS[off]="$URL"; PIDS_OF[off]="$SUT_PID"
for c in "${wanted[@]}"; do
  case "$c" in
    off) continue ;;
    on_*)
      start_proxy "$c" exchange "" \
        "telemetry: {otlp_endpoint: '$ISSUER', service_name: txp-bench, sample_ratio: ${c#on_}}"
      ;;
    two_profiles) start_two_profiles "$c" ;;
    again) start_proxy "$c" exchange ;;
    before)
      [ -n "${BENCH_BEFORE_BIN:-}" ] || continue
      [ -x "$BENCH_BEFORE_BIN" ] || die "BENCH_BEFORE_BIN $BENCH_BEFORE_BIN is not an executable"
      cp "$BENCH_BEFORE_BIN" "$work/bin/before"
      PROXY="$work/bin/before" start_proxy before exchange
      PROXY="$bin/token-exchange-proxy"
      ;;
    *) die "unknown case in BENCH_CASES: $c" ;;
  esac
  URLS[$c]="$URL"; PIDS_OF[$c]="$SUT_PID"; ADMINS[$c]="$ADMIN"
  cases+=("$c")
done

for c in "${cases[@]}"; do
  log "$c: warm-up"
  taskset -c "$LOAD_CPU" "$LOAD" once --url "${URLS[$c]}" --tokens "$work/hit.txt" --concurrency 16 >/dev/null
done

RESULTS="$work/telemetry.jsonl"
: >"$RESULTS"
# Each round runs the cases in a new random order: on a shared machine whatever runs first or
# last in a round would otherwise be measured in its own kind of moment every time.
for r in $(seq 1 "$REPS"); do
  mapfile -t order < <(printf '%s\n' "${cases[@]}" | shuf)
  for c in "${order[@]}"; do
    pid="${PIDS_OF[$c]}"
    c0=$(cpu_ticks "$pid")
    out="$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 10s \
      -s "$repo/benches/tokens.lua" "${URLS[$c]}" -- "$work/hit.txt" | sed -n 's/^WRK_RESULT //p')"
    c1=$(cpu_ticks "$pid")
    [ -n "$out" ] || die "$c: wrk produced no result"
    line="$(python3 -c 'import json,sys; r=json.loads(sys.argv[3]); n=max(r["requests"],1); print(json.dumps({"case":sys.argv[1],"rep":int(sys.argv[2]),"requests":r["requests"],"rps":r["requests"]/(r["duration_us"]/1e6),"errors":r["errors_status"]+r["errors_connect"]+r["errors_read"]+r["errors_write"]+r["errors_timeout"],"cpu_us_per_req":int(sys.argv[4])/float(sys.argv[5])*1e6/n}))' \
      "$c" "$r" "$out" "$((c1 - c0))" "$CLK_TCK")"
    echo "$line" >>"$RESULTS"
    log "$c round $r/$REPS: $line"
  done
done
# Spans of the ratio-1.0 proxy: all exported, none dropped, or the sink was not keeping up.
spans="not measured (no on_1.0 case)"
if [ -n "${ADMINS[on_1.0]:-}" ]; then
  spans="$(metric "${ADMINS[on_1.0]}" txp_trace_spans_exported_total) exported, $(metric "${ADMINS[on_1.0]}" 'txp_trace_spans_dropped_total{reason="queue_full"}') dropped (queue full), $(metric "${ADMINS[on_1.0]}" 'txp_trace_spans_dropped_total{reason="export_failed"}') dropped (export failed)"
fi

mkdir -p "$RESULTS_DIR"
python3 - "$RESULTS" "$RESULTS_DIR" "$SOURCE_VERSION" "duration=${DURATION}s reps=$REPS connections=$CONNS hit_tokens=$HIT_TOKENS" "$spans" "${BENCH_BEFORE_LABEL:-BENCH_BEFORE_BIN}" <<'PY'
import json, os, statistics, sys
results, out_dir, version, settings, spans, before = sys.argv[1:]
runs = [json.loads(l) for l in open(results) if l.strip()]
cases = [c for c in ("off", "again", "before", "two_profiles", "on_1.0", "on_0.01")
         if any(r["case"] == c for r in runs)]
labels = {
    "off": "one profile, traces off (no `telemetry`)",
    "before": f"earlier build: {before}",
    "two_profiles": "two profiles (tokens of the second), traces off",
    "again": "one profile, traces off: a second, identical proxy (no difference)",
    "on_1.0": "traces on, sample_ratio 1.0",
    "on_0.01": "traces on, sample_ratio 0.01",
}
by = {c: {r["rep"]: r for r in runs if r["case"] == c} for c in cases}
summary = {}
lines = [f"# Cache-hit CPU per request, side by side (source `{version}`)", "",
         f"Settings: {settings}. CPU of the proxy per request; ratios are per round (each run "
         "against `off`'s run of the same round), median shown with the rounds beside it.", "",
         "| case | CPU µs/req (median) | req/s (median) | CPU vs off (median of rounds) | by round | errors |",
         "|---|---:|---:|---:|---|---:|"]
for c in cases:
    cpu = statistics.median(r["cpu_us_per_req"] for r in by[c].values())
    rps = statistics.median(r["rps"] for r in by[c].values())
    rounds = [by[c][k]["cpu_us_per_req"] / by["off"][k]["cpu_us_per_req"]
              for k in sorted(by[c]) if k in by["off"]]
    ratio = statistics.median(rounds)
    errors = sum(r["errors"] for r in by[c].values())
    summary[c] = {"cpu_us_per_req_median": cpu, "rps_median": rps, "cpu_vs_off": ratio,
                  "cpu_vs_off_by_round": rounds, "errors": errors}
    lines.append(f"| {labels[c]} | {cpu:.2f} | {rps:.0f} | {ratio:.3f}× | "
                 f"{', '.join(f'{x:.3f}' for x in rounds)} | {errors} |")
lines += ["", f"Spans of the sample_ratio 1.0 proxy over the whole run: {spans}.", ""]
print("\n".join(lines))
with open(os.path.join(out_dir, "telemetry.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(out_dir, "telemetry.json"), "w") as f:
    json.dump({"source": version, "settings": settings, "spans_at_ratio_1": spans,
               "cases": summary, "runs": runs}, f, indent=1)
PY
