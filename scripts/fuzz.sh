#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ through afl.rs (`make fuzz`: 10 minutes per target;
# `make test`: 30 s per target). README "Reliability".
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Installs cargo-afl (crates.io, stable Rust; it builds AFL++ from the sources it ships) into
# .tools/cargo on first use, builds fuzz/ instrumented into $CARGO_TARGET_DIR/afl (or
# target/afl), then runs afl-fuzz on each target from its corpus in fuzz/corpus/<target>/.
# Prints executions, paths, crashes and hangs per target; exits 1 if any target crashed (the
# crashing inputs are copied to fuzz/crashes/<target>/ to be turned into regression tests;
# inputs that ran over the time limit go to fuzz/hangs/<target>/).
# FUZZ_UPDATE_CORPUS=1 (set by `make fuzz`) merges what the run found into the kept corpus,
# minimised with afl-cmin.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

SECONDS_PER_TARGET="${1:-600}"
shift || true
CARGO_AFL_VERSION=0.18.2
TOOLS="$repo/.tools/cargo"
export PATH="$TOOLS/bin:$PATH"
TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}/afl"
BIN="$TARGET_DIR/release/txp-fuzz"
ALL_TARGETS=(bearer_header jwt jwks exchange_response introspection_response config)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

log() { printf 'fuzz: %s\n' "$*" >&2; }

if ! cargo afl --version 2>/dev/null | grep -q "$CARGO_AFL_VERSION"; then
  log "installing cargo-afl $CARGO_AFL_VERSION into ${TOOLS#"$repo"/}"
  cargo install --locked --root "$TOOLS" "cargo-afl@$CARGO_AFL_VERSION"
fi
# AFL++ itself lives in cargo-afl's data directory, one build per compiler version; build it
# there if it is missing (about a minute).
rustc_id="rustc-$(rustc -V | awk '{print $2}')-$(rustc -vV | awk '/^commit-hash:/ {print substr($2, 1, 7)}')"
afl_dir="${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs/$rustc_id/afl.rs-$CARGO_AFL_VERSION"
if [ ! -x "$afl_dir/afl/bin/afl-fuzz" ]; then
  log "building AFL++"
  cargo afl config --build --force
fi
log "building the fuzz targets (instrumented)"
(cd fuzz && CARGO_TARGET_DIR="$TARGET_DIR" cargo afl build --release --locked)

work="$(mktemp -d "${TMPDIR:-/tmp}/txp-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Crashes are reported by the harness's abort, not by a core dump handler; the machine is
# shared (no CPU binding); no screen.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_SKIP_CRASHES=1 AFL_QUIET=1

failed=0
printf '| target | seconds | executions | execs/s | corpus (start → found) | crashes | hangs |\n|---|---:|---:|---:|---|---:|---:|\n' >"$work/summary.md"
for t in "${TARGETS[@]}"; do
  out="$work/$t"
  log "$t: ${SECONDS_PER_TARGET}s"
  start=$(date +%s)
  cargo afl fuzz -i "fuzz/corpus/$t" -o "$out" -V "$SECONDS_PER_TARGET" -- "$BIN" "$t" \
    >"$work/$t.log" 2>&1 || { tail -n 30 "$work/$t.log" >&2; log "$t: afl-fuzz failed"; failed=1; continue; }
  stats="$out/default/fuzzer_stats"
  field() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$stats"; }
  execs=$(field execs_done)
  crashes=$(field saved_crashes)
  hangs=$(field saved_hangs)
  secs=$(($(date +%s) - start))
  seeds=$(find "fuzz/corpus/$t" -type f | wc -l)
  found=$(field corpus_count)
  printf '| %s | %d | %s | %s | %s → %s | %s | %s |\n' "$t" "$secs" "$execs" \
    "$((execs / (secs > 0 ? secs : 1)))" "$seeds" "$found" "$crashes" "$hangs" >>"$work/summary.md"
  if [ "${crashes:-0}" != 0 ]; then
    failed=1
    mkdir -p "fuzz/crashes/$t"
    cp "$out"/default/crashes/id:* "fuzz/crashes/$t/" 2>/dev/null || true
    log "$t: $crashes crashes, inputs in fuzz/crashes/$t/"
  fi
  if [ "${hangs:-0}" != 0 ]; then
    # A hang is an input that ran over AFL++'s time limit (1 s); on a busy machine that may be
    # the machine. Kept for a look (`txp-fuzz <target> < input`), not a failure.
    mkdir -p "fuzz/hangs/$t"
    cp "$out"/default/hangs/id:* "fuzz/hangs/$t/" 2>/dev/null || true
    log "$t: $hangs hangs, inputs in fuzz/hangs/$t/"
  fi
  if [ "${FUZZ_UPDATE_CORPUS:-0}" = 1 ]; then
    mkdir -p "$work/$t-all"
    cp "fuzz/corpus/$t"/* "$work/$t-all/"
    for f in "$out"/default/queue/id:*; do cp "$f" "$work/$t-all/q-$(basename "$f" | cut -c4-9)"; done
    if cargo afl cmin -i "$work/$t-all" -o "$work/$t-min" -- "$BIN" "$t" >"$work/$t-cmin.log" 2>&1; then
      rm -f "fuzz/corpus/$t"/q-*
      for f in "$work/$t-min"/q-*; do [ -e "$f" ] && cp "$f" "fuzz/corpus/$t/"; done
      log "$t: corpus now $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
    else
      log "$t: afl-cmin failed; corpus left as it was"
    fi
  fi
done
cat "$work/summary.md"
if [ -n "${FUZZ_SUMMARY:-}" ]; then cp "$work/summary.md" "$FUZZ_SUMMARY"; fi
exit "$failed"
