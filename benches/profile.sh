#!/usr/bin/env bash
# Where the proxy's CPU goes on the cache-hit path, measured without noise: user-space
# instructions per request (valgrind --tool=callgrind), for the bare forwarder, the proxy in
# passthrough mode, in exchange mode (cache hit), in exchange mode with the access log off and
# with two profiles (README "Several issuers": the second profile's tokens, and both's alternating),
# plus the inclusive cost of the proxy's own steps. Instruction counts do not depend on what
# else runs on the machine, so they compare builds reliably where requests/s cannot.
#
# Instructions alone hide what a change does to the CPU's caches and branch predictors, so the
# runs also simulate them (--cache-sim=yes --branch-sim=yes) and the table gives an estimate of
# cycles per request: Ir + 10 × (L1 misses + mispredicted branches) + 100 × last-level misses,
# KCachegrind's "cycle estimation" weights, on a fixed model of the caches (32 KiB 8-way L1
# for instructions and for data, a 2 MiB 16-way last level: one core's share of a server's L3),
# so that machines compare. Like the instruction count it is deterministic.
#
#   bash benches/profile.sh            # prints the table, writes benches/results/profile.md
#   BENCH_BEFORE_BIN=/tmp/txp-before/target/release/token-exchange-proxy BENCH_BEFORE_LABEL=7e35f8d \
#     bash benches/profile.sh          # also the cache hit of an earlier build, same run
#
# Caveats: kernel time (the socket system calls, about half of the CPU time on loopback) is
# not counted; under valgrind, aws-lc cannot use the CPU's SHA extensions and falls back to
# its AVX code, so SHA-256 is over-represented (about 36,000 instructions of a cache hit, a
# few thousand cycles natively): the table also gives each figure without SHA-256's own code,
# which is the fairer comparison between builds that hash differently (compare with
# `cargo bench --bench hot_path`, exchange/cache_key). Needs valgrind (`apt-get install valgrind`).
#
# Knobs: BENCH_PROFILE_REQUESTS (2000), BENCH_SKIP_BUILD=1, BENCH_KEEP=1 (keep the callgrind
# files in the scratch directory for callgrind_annotate), BENCH_BEFORE_BIN and
# BENCH_BEFORE_LABEL (an earlier build's proxy binary, and its name in the table).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

REQUESTS="${BENCH_PROFILE_REQUESTS:-2000}"
HIT_TOKENS=500
LOAD_CPU="${BENCH_LOAD_CPU:-0}"
PROXY_CPU="${BENCH_PROXY_CPU:-1}"
IDP_DELAY_MS=5 # used by lib.sh (start_cast)
TOKEN_BYTES="${BENCH_TOKEN_BYTES:-1000}"
RESULTS_DIR="${BENCH_RESULTS_DIR:-$repo/benches/results}"
# shellcheck source=benches/lib.sh source-path=SCRIPTDIR/..
source "$repo/benches/lib.sh"

for t in valgrind callgrind_control callgrind_annotate taskset curl python3; do
  command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install valgrind)"
done
prepare_binaries
start_cast
rounds=$(((REQUESTS + HIT_TOKENS - 1) / HIT_TOKENS))
for _ in $(seq 1 "$rounds"); do cat "$work/hit.txt"; done | head -n "$REQUESTS" >"$work/measured.txt"

# profile NAME READY_URL URL CMD...: runs CMD under callgrind with instrumentation off, sends
# every hit token once (warm-up), then counts REQUESTS requests.
profile() {
  local name="$1" ready="$2" url="$3" vpid
  shift 3
  TOKIO_WORKER_THREADS=1 START_OUT=/dev/null start "$name" "$PROXY_CPU" valgrind --tool=callgrind \
    --cache-sim=yes --branch-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=2097152,16,64 \
    --instr-atstart=no --callgrind-out-file="$work/$name.callgrind" "$@"
  vpid=$STARTED_PID
  for _ in $(seq 1 300); do
    case "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ready" || true)" in
      200 | 401 | 404) break ;;
    esac
    sleep 0.1
  done
  taskset -c "$LOAD_CPU" "$LOAD" once --url "$url" --tokens "${HIT_FILE:-$work/hit.txt}" --concurrency 16 >/dev/null
  callgrind_control -i on "$vpid" >/dev/null 2>&1
  local out
  out="$(taskset -c "$LOAD_CPU" "$LOAD" once --url "$url" --tokens "${MEASURED_FILE:-$work/measured.txt}" --concurrency 16)"
  callgrind_control -i off "$vpid" >/dev/null 2>&1
  callgrind_control -d "$vpid" >/dev/null 2>&1
  stop_pid "$vpid"
  printf '%s' "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); sys.exit(0 if r["ok"] == r["sent"] else 1)' \
    || die "$name: not every request succeeded: $out"
  log "$name: profiled $REQUESTS requests"
}

port="$(free_port)"
profile bare "http://127.0.0.1:$port/" "http://127.0.0.1:$port/mcp" \
  "$bin/examples/bare_forwarder" --listen "127.0.0.1:$port" --upstream "$BACKEND"
for spec in passthrough:passthrough: exchange_hit:exchange: exchange_hit_nolog:exchange:warn; do
  IFS=: read -r name mode level <<<"$spec"
  port="$(free_port)"
  admin="$(free_port)"
  proxy_config "$work/$name.yaml" "$mode" "$port" "$admin" "$level"
  profile "$name" "http://127.0.0.1:$admin/readyz" "http://127.0.0.1:$port/mcp" \
    "$PROXY" --config "$work/$name.yaml"
done

port="$(free_port)"
admin="$(free_port)"
two_profiles_config "$work/exchange_hit_two_profiles.yaml" "$port" "$admin"
profile exchange_hit_two_profiles "http://127.0.0.1:$admin/readyz" "http://127.0.0.1:$port/mcp" \
  "$PROXY" --config "$work/exchange_hit_two_profiles.yaml"

# Both profiles' tokens, alternating: the partner profile's from a second fake IdP.
start partner_idp "$LOAD_CPU" "$bin/examples/bench_idp" --listen 127.0.0.1:0 --delay-ms "$IDP_DELAY_MS" \
  --token-bytes "$TOKEN_BYTES"
partner="$(first_line partner_idp)"
curl -sf --max-time 120 "$partner/mint?n=$HIT_TOKENS&tag=partner" -o "$work/partner.txt" \
  || die "minting partner tokens failed"
paste -d '\n' "$work/partner.txt" "$work/hit.txt" >"$work/mixed.txt"
# (Whole copies only up to what is needed: `head` closing the pipe early would fail it.)
for _ in $(seq 1 $(((REQUESTS + 2 * HIT_TOKENS - 1) / (2 * HIT_TOKENS)))); do cat "$work/mixed.txt"; done \
  | head -n "$REQUESTS" >"$work/measured-mixed.txt"
port="$(free_port)"
admin="$(free_port)"
two_profiles_config "$work/exchange_hit_two_profiles_mixed.yaml" "$port" "$admin" "$partner"
HIT_FILE="$work/mixed.txt" MEASURED_FILE="$work/measured-mixed.txt" \
  profile exchange_hit_two_profiles_mixed "http://127.0.0.1:$admin/readyz" "http://127.0.0.1:$port/mcp" \
  "$PROXY" --config "$work/exchange_hit_two_profiles_mixed.yaml"

# An earlier build's cache hit, same config, same tokens (BENCH_BEFORE_BIN).
names="bare passthrough exchange_hit exchange_hit_nolog exchange_hit_two_profiles exchange_hit_two_profiles_mixed"
if [ -n "${BENCH_BEFORE_BIN:-}" ]; then
  [ -x "$BENCH_BEFORE_BIN" ] || die "BENCH_BEFORE_BIN $BENCH_BEFORE_BIN is not an executable"
  cp "$BENCH_BEFORE_BIN" "$work/bin/before"
  port="$(free_port)"
  admin="$(free_port)"
  proxy_config "$work/exchange_hit_before.yaml" exchange "$port" "$admin" ""
  profile exchange_hit_before "http://127.0.0.1:$admin/readyz" "http://127.0.0.1:$port/mcp" \
    "$work/bin/before" --config "$work/exchange_hit_before.yaml"
  names="$names exchange_hit_before"
fi

for name in $names; do
  # The dump requested above is NAME.callgrind.1; NAME.callgrind is written at exit.
  f="$work/$name.callgrind"
  for g in "$work/$name.callgrind".*; do
    [ -f "$g" ] && f="$g" && break
  done
  callgrind_annotate --show=Ir --inclusive=yes --threshold=100 "$f" >"$work/$name.annotate" 2>/dev/null
  # Every event, each function's own cost: the totals and SHA-256's share of them.
  callgrind_annotate --auto=no --threshold=100 "$f" >"$work/$name.events" 2>/dev/null
done

mkdir -p "$RESULTS_DIR"
python3 - "$work" "$REQUESTS" "$RESULTS_DIR/profile.md" "$TOKEN_BYTES" "$names" \
  "${BENCH_BEFORE_LABEL:-BENCH_BEFORE_BIN}" <<'PY'
import json, re, sys
work, n, out_path, token_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
names, before_label = sys.argv[5].split(), sys.argv[6]

# KCachegrind's cycle estimation: Ir + 10 x (L1 misses + mispredicted branches) + 100 x
# last-level misses.
WEIGHTS = {"Ir": 1, "I1mr": 10, "D1mr": 10, "D1mw": 10, "ILmr": 100, "DLmr": 100, "DLmw": 100,
           "Bcm": 10, "Bim": 10}

def events(name):
    """Program totals and SHA-256's own cost, per event, from the all-events annotation."""
    order, totals, sha = [], None, None
    for line in open(f"{work}/{name}.events"):
        if line.startswith("Events shown:"):
            order = line.split(":", 1)[1].split()
            continue
        fields = re.sub(r"\(\s*[\d.]+%\)", "", line).split()
        if len(fields) <= len(order) or not order:
            continue
        values = fields[:len(order)]
        if not all(re.fullmatch(r"[\d,]+|\.", v) for v in values):
            continue
        counts = dict(zip(order, (0 if v == "." else int(v.replace(",", "")) for v in values)))
        what = " ".join(fields[len(order):])
        if "PROGRAM TOTALS" in what:
            totals = counts
        elif "sha256_block_data_order" in what:
            sha = {k: sha.get(k, 0) + v for k, v in counts.items()} if sha else counts
    return totals or {}, sha or {}

def cycles(counts):
    return sum(WEIGHTS.get(k, 0) * v for k, v in counts.items())

def load(name):
    costs = {}
    total = None
    for line in open(f"{work}/{name}.annotate"):
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        what = m.group(2)
        if "PROGRAM TOTALS" in what:
            total = ir
            continue
        # Keep the largest inclusive figure per function name (callgrind lists a function once
        # per file it was inlined from).
        fn = re.sub(r"\s*\[[^\]]*\]\s*$", "", what)
        fn = fn.split(":", 1)[1] if ":" in fn else fn
        costs[fn] = max(costs.get(fn, 0), ir)
    return total or 0, costs

def find(costs, pattern):
    """The inclusive cost of the function matching `pattern`; None when the optimiser inlined
    it into its callers (no symbol of its own to count)."""
    return max((v for k, v in costs.items() if pattern in k), default=None)

rows = []
totals = {}
estimates = {}
for name in names:
    total, costs = load(name)
    totals[name] = (total, costs)
    counts, sha = events(name)
    estimates[name] = {"cycles": cycles(counts) / n, "sha256": cycles(sha) / n,
                       "misses": {k: counts.get(k, 0) / n for k in WEIGHTS if k != "Ir"}}

steps = [
    ("access log line (`AccessLog::drop`: format + buffer)", "AccessLog as core::ops::drop::Drop>::drop"),
    ("`KeyDeriver::key_of` (the exchange key: one SHA-256 block after the token's digest)", "exchange::cache::KeyDeriver::key"),
    ("SHA-256 in all (the token's digest and the key; AVX code under valgrind)", "sha256_block_data_order"),
    ("`inbound::layer::bearer_token`", "inbound::layer::bearer_token"),
    ("`proxy::headers::prepare_request`", "proxy::headers::prepare_request"),
    ("`proxy::headers::strip_hop_by_hop` (request and response)", "proxy::headers::strip_hop_by_hop"),
    ("hyper-util legacy client (upstream request)", "Client<C,B>::send_request::{{closure}}"),
]
lines = []
w = lines.append
w("# Instructions per request (callgrind), cache-hit path")
w("")
w(f"User-space instructions per request (valgrind callgrind) over {n} requests after a warm-up, "
  f"tokens of about {token_bytes} bytes; kernel time not included. Reproducible to within a few "
  "hundred instructions whatever else runs on the machine (`bash benches/profile.sh`).")
w("")
w("| server | instructions/request | vs bare forwarder |")
w("|---|---:|---:|")
bare_total = totals["bare"][0]
for name, label in [("bare", "bare forwarder"), ("passthrough", "proxy, passthrough"),
                    ("exchange_hit", "proxy, exchange, cache hit"),
                    ("exchange_hit_nolog", "proxy, exchange, cache hit, access log off"),
                    ("exchange_hit_two_profiles", "proxy, exchange, cache hit, two profiles (tokens of the second)"),
                    ("exchange_hit_two_profiles_mixed",
                     "proxy, exchange, cache hit, two profiles (tokens of both, alternating)"),
                    ("exchange_hit_before", f"proxy, exchange, cache hit: earlier build {before_label}")]:
    if name not in totals:
        continue
    t = totals[name][0]
    w(f"| {label} | {t / n:,.0f} | {t / bare_total:.2f}× |")
w("")
w("Estimated cycles per request (cache and branch simulation, KCachegrind's weights: "
  "Ir + 10 × (L1 misses + mispredicted branches) + 100 × last-level misses); the last two "
  "columns leave out SHA-256's own code, which valgrind runs without the CPU's SHA extensions:")
w("")
w("| server | L1 misses/request | mispredicted branches/request | est. cycles/request | "
  "without SHA-256 | vs bare forwarder, without SHA-256 |")
w("|---|---:|---:|---:|---:|---:|")
def lean(name):
    return estimates[name]["cycles"] - estimates[name]["sha256"]
estimated_rows = [("bare", "bare forwarder"), ("passthrough", "proxy, passthrough"),
                  ("exchange_hit", "proxy, exchange, cache hit")]
if "exchange_hit_before" in estimates:
    estimated_rows.append(("exchange_hit_before", f"proxy, exchange, cache hit: earlier build {before_label}"))
for name, label in estimated_rows:
    e = estimates[name]
    l1 = e["misses"]["I1mr"] + e["misses"]["D1mr"] + e["misses"]["D1mw"]
    bm = e["misses"]["Bcm"] + e["misses"]["Bim"]
    w(f"| {label} | {l1:,.0f} | {bm:,.0f} | {e['cycles']:,.0f} | {lean(name):,.0f} | "
      f"{lean(name) / lean('bare'):.2f}× |")
w("")
if "exchange_hit_before" in estimates:
    b, c = lean("exchange_hit_before"), lean("exchange_hit")
    w(f"Cache hit against the earlier build {before_label}, SHA-256 left out: {c / b:.3f}× "
      f"({c - b:+,.0f} estimated cycles per request); with it: "
      f"{estimates['exchange_hit']['cycles'] / estimates['exchange_hit_before']['cycles']:.3f}×. "
      f"Instructions: {totals['exchange_hit'][0] / totals['exchange_hit_before'][0]:.3f}×.")
    w("")
one = totals["exchange_hit"][0]
for case, tokens in [("exchange_hit_two_profiles", "the second profile's tokens"),
                     ("exchange_hit_two_profiles_mixed", "both profiles' tokens, alternating")]:
    two = totals[case][0]
    w(f"Two profiles, {tokens}: {(two - one) / n:+,.0f} instructions per request against one "
      f"profile ({100 * (two - one) / one:+.2f}%).")
w("")
w("Inclusive cost of the proxy's steps (exchange, cache hit):")
w("")
w("| step | instructions/request | share |")
w("|---|---:|---:|")
total, costs = totals["exchange_hit"]
step_costs = {}
for label, pattern in steps:
    v = find(costs, pattern)
    if v is None:
        step_costs[label.strip()] = None
        w(f"| {label} | inlined | |")
        continue
    step_costs[label.strip()] = round(v / n)
    w(f"| {label} | {v / n:,.0f} | {100 * v / total:.1f}% |")
w("")
w("\"inlined\": the release build's whole-program LTO left the step no function of its own, so "
  "its cost is counted in its callers'.")
w("")
w("Under valgrind aws-lc cannot use the CPU's SHA extensions, so the SHA-256 row is several times "
  "its native cost; `cargo bench --bench hot_path` (exchange/cache_key) gives the native figure.")
md = "\n".join(lines) + "\n"
open(out_path, "w").write(md)
json_path = re.sub(r"\.md$", ".json", out_path)
with open(json_path, "w") as f:
    json.dump({
        "requests": n,
        "token_bytes": int(token_bytes),
        "instructions_per_request": {k: round(v[0] / n) for k, v in totals.items()},
        "exchange_hit_steps": step_costs,
        "estimated_cycles_per_request": {k: round(v["cycles"]) for k, v in estimates.items()},
        "estimated_cycles_per_request_without_sha256": {k: round(v["cycles"] - v["sha256"])
                                                         for k, v in estimates.items()},
    }, f, indent=2)
    f.write("\n")
sys.stdout.write(md)
PY
