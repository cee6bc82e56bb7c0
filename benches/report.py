#!/usr/bin/env python3
"""Turns the result lines of benches/run.sh into benches/results/latest.md and latest.json,
and prints the markdown.

    report.py RESULTS.jsonl OUT_DIR --cpu-model M --nproc N --kernel K --settings S
"""

import argparse
import datetime
import json
import os
import statistics
import sys

CASES = [
    ("direct", "direct to the backend (no proxy)"),
    ("bare_forwarder", "bare hyper forwarder (floor)"),
    ("passthrough", "token-exchange-proxy, passthrough (validation only)"),
    ("exchange_hit", "token-exchange-proxy, exchange, cache hit"),
    ("exchange_miss", "token-exchange-proxy, exchange, every request a miss"),
    ("envoy_jwt_authn", "Envoy 1.40 jwt_authn"),
    ("exchange_hit_nolog", "diagnostic: exchange, cache hit, access log off"),
    ("exchange_hit_two_profiles", "exchange, cache hit, two profiles (tokens of the second)"),
]

# KiB per MiB (VmRSS is reported in KiB).
MIB = 1024.0
# A run counts as saturated when the server under test used at least this share of its core.
SATURATED = 90.0


def fmt(v, spec="{:.0f}", none="–"):
    return none if v is None else spec.format(v)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out_dir")
    ap.add_argument("--cpu-model", default="unknown")
    ap.add_argument("--nproc", default="?")
    ap.add_argument("--kernel", default="unknown")
    ap.add_argument("--settings", default="")
    ap.add_argument("--proxy-version", default="unknown")
    a = ap.parse_args()

    lines = [json.loads(l) for l in open(a.results) if l.strip()]
    cases = {}
    for key, _ in CASES:
        runs = [l for l in lines if l.get("kind") == "run" and l["case"] == key]
        if not runs:
            continue
        cpu = [r["cpu_us_per_req"] for r in runs if r["cpu_us_per_req"] is not None]
        # CPU per request is the server's own cost only while it is the bottleneck; in a run
        # where a neighbour slowed the load generator it also pays for idle wake-ups.
        saturated = [r["cpu_us_per_req"] for r in runs
                     if r["cpu_us_per_req"] is not None and (r.get("sut_core_pct") or 0) >= SATURATED]
        cases[key] = {
            "runs": runs,
            "rps_median": statistics.median(r["rps"] for r in runs),
            "cpu_us_per_req_median": statistics.median(saturated or cpu) if cpu else None,
            "cpu_from_saturated_runs": len(saturated),
            "latency": next((l for l in lines if l.get("kind") == "latency" and l["case"] == key), {}),
            "warmup": next((l for l in lines if l.get("kind") == "warm" and l["case"] == key), {}),
        }
    single = next((l for l in lines if l.get("kind") == "single_flight"), None)
    memories = [l for l in lines if l.get("kind") == "memory"]
    memory = next((m for m in memories if m.get("label", "main") == "main"), None)
    memory_short = next((m for m in memories if m.get("label") == "short"), None)
    startup = next((l for l in lines if l.get("kind") == "startup"), None)
    envoy_stats = next((l["stats"] for l in lines if l.get("kind") == "envoy_jwt_stats"), {})

    def round_ratios(key, ref, field):
        """The ratio of a case's run to the reference's run of the same round (minutes apart
        at most), round by round: the machine's speed drifts between rounds by more than the
        differences measured, so ratios are taken within a round."""
        mine = {x["rep"]: x.get(field) for x in cases.get(key, {}).get("runs", [])}
        theirs = {x["rep"]: x.get(field) for x in cases.get(ref, {}).get("runs", [])}
        vals = [ratio(mine[k], theirs.get(k)) for k in sorted(mine)]
        return [v for v in vals if v is not None]

    def paired(key, ref, field):
        """The median of [`round_ratios`]."""
        vals = round_ratios(key, ref, field)
        return statistics.median(vals) if vals else None

    bare = cases.get("bare_forwarder", {})
    envoy = cases.get("envoy_jwt_authn", {})
    hit = cases.get("exchange_hit", {})
    bare_rps, bare_cpu = bare.get("rps_median"), bare.get("cpu_us_per_req_median")
    envoy_cpu = envoy.get("cpu_us_per_req_median")

    out = []
    w = out.append
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    w(f"# token-exchange-proxy benchmark ({now})")
    w("")
    w(f"Machine: {a.nproc} CPUs, {a.cpu_model}, {a.kernel}. Source: `{a.proxy_version}`.")
    w(f"Settings: {a.settings}.")
    w("")
    w("| case | max req/s (median) | CPU µs/req (median) | p50 / p99 at fixed rate | req/s vs bare | CPU vs bare | CPU vs Envoy |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for key, label in CASES:
        c = cases.get(key)
        if not c:
            w(f"| {label} | not run | | | | | |")
            continue
        rps, cpu = c.get("rps_median"), c.get("cpu_us_per_req_median")
        lat = c.get("latency", {})
        lat_s = f"{lat.get('p50_us', 0) / 1000:.2f} / {lat.get('p99_us', 0) / 1000:.2f} ms"
        if lat.get("ok") != lat.get("sent"):
            lat_s += f" ({lat.get('sent', 0) - lat.get('ok', 0)} failed)"
        cpu_s = fmt(cpu, "{:.1f}") if key != "direct" else "–"
        if key != "direct" and cpu is not None and not c["cpu_from_saturated_runs"]:
            cpu_s += " *"
        rps_vs = fmt(paired(key, "bare_forwarder", "rps"), "{:.2f}×") if key not in ("bare_forwarder", "direct") else "–"
        cpu_vs = fmt(paired(key, "bare_forwarder", "cpu_us_per_req"), "{:.2f}×") if key not in ("bare_forwarder", "direct") else "–"
        env_vs = fmt(paired(key, "envoy_jwt_authn", "cpu_us_per_req"), "{:.2f}×") if key not in ("envoy_jwt_authn", "direct") else "–"
        w(f"| {label} | {fmt(rps)} | {cpu_s} | {lat_s} | {rps_vs} | {cpu_vs} | {env_vs} |")
    w("")
    w(f"CPU µs/req is the median over the runs in which the server under test kept its core at least "
      f"{SATURATED:.0f}% busy (* when none did: then over all runs). Ratios (\"vs\" columns and "
      "targets) are medians of per-round ratios: each run is compared with the reference's run of "
      "the same round, because the machine's speed drifts between rounds by more than the "
      "differences measured; the ratio of the medians is shown beside each target.")
    w("")
    if single:
        w(f"- Single flight: {single['requests']} concurrent requests with one new token → "
          f"**{single['idp_calls']} IdP call(s)**; {single['ok']} answered 2xx "
          f"(proxy counters: {single['cache_misses']} miss, {single['cache_coalesced']} coalesced, "
          f"{single['cache_hits']} hit).")
    def per_token(m):
        return (m["filled_rss_kib"] - m["idle_rss_kib"]) * 1024 / max(m["fill_requests"], 1)

    for m in [x for x in (memory, memory_short) if x]:
        w(f"- Resident memory (VmRSS), issued tokens of {m.get('token_bytes', '?')} bytes: idle "
          f"**{m['idle_rss_kib'] / MIB:.1f} MiB**; after "
          f"{m['fill_requests']:,} distinct new tokens ({m['fill_idp_calls']:,} exchanges, "
          f"cache entries metric {m['cache_entries_metric']:,}) **{m['filled_rss_kib'] / MIB:.1f} MiB** "
          f"(peak {m['filled_hwm_kib'] / MIB:.1f} MiB; fill ran at {m['fill']['rps']:.0f} req/s, "
          f"{m['fill']['ok']:,} × 2xx): about {per_token(m):,.0f} bytes per new client token, "
          "each leaving one entry in the exchange cache (the issued token, the client's `sub`, "
          "its acceptance) and nothing in the validation cache.")
    if memory and memory_short and memory.get("token_bytes") != memory_short.get("token_bytes"):
        slope = (per_token(memory) - per_token(memory_short)) / (memory["token_bytes"] - memory_short["token_bytes"])
        overhead = per_token(memory) - slope * memory["token_bytes"]
        w(f"- So an entry costs about {overhead:,.0f} bytes besides its token "
          f"({slope:.2f} bytes per token byte): the cache's own bookkeeping and the allocator's.")
    if envoy_stats:
        hits = sum(v for k, v in envoy_stats.items() if k.endswith("jwt_cache_hit") and isinstance(v, int))
        misses = sum(v for k, v in envoy_stats.items() if k.endswith("jwt_cache_miss") and isinstance(v, int))
        if hits or misses:
            w(f"- Envoy's JWT cache over the whole run: {hits:,} hits, {misses:,} misses.")
    if startup:
        runs = ", ".join(f"{x:.0f}" for x in startup["runs_ms"])
        w(f"- Start to `/readyz` 200 (discovery + JWKS from the fake IdP): median "
          f"**{startup['median_ms']:.0f} ms** (runs: {runs} ms).")
    w("")

    # Targets.
    targets = []
    hit_cpu, hit_rps = hit.get("cpu_us_per_req_median"), hit.get("rps_median")

    def per_run(field, ref, spec):
        """The cache-hit case's round-by-round ratios to `ref`, for the targets table."""
        vals = [spec.format(v) for v in round_ratios("exchange_hit", ref, field)]
        return f" (by run: {', '.join(vals)})" if len(vals) > 1 else ""

    r = paired("exchange_hit", "bare_forwarder", "cpu_us_per_req")
    targets.append(("cache-hit CPU/request ≤ 1.2× bare forwarder",
                    fmt(r, "{:.2f}×") + per_run("cpu_us_per_req", "bare_forwarder", "{:.2f}")
                    + f"; ratio of medians {fmt(ratio(hit_cpu, bare_cpu), '{:.2f}×')}", r is not None and r <= 1.2))
    r = paired("exchange_hit", "envoy_jwt_authn", "cpu_us_per_req")
    targets.append(("cache-hit CPU/request ≤ 0.5× Envoy jwt_authn",
                    fmt(r, "{:.2f}×") + per_run("cpu_us_per_req", "envoy_jwt_authn", "{:.2f}")
                    + f"; ratio of medians {fmt(ratio(hit_cpu, envoy_cpu), '{:.2f}×')}", r is not None and r <= 0.5))
    r = paired("exchange_hit", "bare_forwarder", "rps")
    rm = ratio(hit_rps, bare_rps)
    targets.append(("cache-hit max req/s ≥ 85% of bare forwarder",
                    fmt(r * 100 if r else None, "{:.0f}%") + per_run("rps", "bare_forwarder", "{:.2f}")
                    + f"; ratio of medians {fmt(rm * 100 if rm else None, '{:.0f}%')}", r is not None and r >= 0.85))
    r = paired("exchange_hit_two_profiles", "exchange_hit", "cpu_us_per_req")
    if r is not None:
        targets.append(("two profiles: cache-hit CPU/request ≤ 1.02× one profile",
                        fmt(r, "{:.3f}×") + " (median of the rounds' ratios; by run: "
                        + ", ".join(f"{v:.3f}" for v in round_ratios("exchange_hit_two_profiles", "exchange_hit",
                                                                       "cpu_us_per_req")) + ")",
                        r <= 1.02))
    if single:
        targets.append(("1,000 concurrent, one new token → exactly 1 IdP call", str(single["idp_calls"]), single["idp_calls"] == 1))
    if memory:
        targets.append(("idle RSS ≤ 16 MiB", f"{memory['idle_rss_kib'] / MIB:.1f} MiB", memory["idle_rss_kib"] <= 16 * MIB))
        targets.append((f"RSS with 100k cached exchanges ≤ 128 MiB ({memory.get('token_bytes', '?')}-byte tokens)",
                        f"{memory['filled_rss_kib'] / MIB:.1f} MiB", memory["filled_rss_kib"] <= 128 * MIB))
    if memory_short:
        targets.append((f"the same with {memory_short.get('token_bytes', '?')}-byte tokens",
                        f"{memory_short['filled_rss_kib'] / MIB:.1f} MiB", memory_short["filled_rss_kib"] <= 128 * MIB))
    w("| target | measured | met |")
    w("|---|---:|:---:|")
    for what, measured, ok in targets:
        w(f"| {what} | {measured} | {'yes' if ok else '**no**'} |")
    w("")

    # Per-run detail, so that noise and honesty checks are visible.
    w("<details><summary>Runs</summary>")
    w("")
    w("| case | run req/s | CPU µs/req | own core busy | backend CPU µs/req | errors | IdP calls / requests | other load on proxy core |")
    w("|---|---|---|---|---|---|---|---|")
    for key, label in CASES:
        c = cases.get(key)
        if not c:
            continue
        runs = c["runs"]
        w(f"| {key} | {', '.join(fmt(x['rps']) for x in runs)} | "
          f"{', '.join(fmt(x['cpu_us_per_req'], '{:.1f}') for x in runs)} | "
          f"{', '.join(fmt(x.get('sut_core_pct'), '{:.0f}%') for x in runs)} | "
          f"{', '.join(fmt(x['backend_cpu_us_per_req'], '{:.1f}') for x in runs)} | "
          f"{', '.join(str(x['non_2xx'] + x['socket_errors']) for x in runs)} | "
          f"{', '.join('{}/{}'.format(x['idp_calls'], x['requests']) for x in runs)} | "
          f"{', '.join('{:.0f}%'.format(x['proxy_core_other_pct']) for x in runs)} |")
    w("")
    w("</details>")
    w("")
    other = [r["proxy_core_other_pct"] for c in cases.values() for r in c["runs"] if c is not cases.get("direct")]
    w("How to read this:")
    w("")
    w("- Each server under test runs on its own core with one worker thread; the load generator "
      "(wrk, closed loop, one thread), the backend and the fake IdP share the other core. All "
      "servers run side by side and the runs are interleaved (run 1 of every case, then run 2, …); "
      "the table shows medians.")
    w("- CPU µs/req: user+system time of the server under test (all its threads) divided by the "
      "requests answered, during the closed-loop runs. On loopback about half of it is kernel "
      "time spent in the socket calls. That part is not fixed: a socket write that wakes a "
      "sleeping reader on the other core costs more than one to a reader that is running, so the "
      "slower a server is, the more idle the load generator's core and the more each of its "
      "writes costs; CPU ratios between servers come out wider than the ratios of their own work.")
    w("- Latency: `examples/bench_load.rs` at a fixed rate (open loop over 32 connections, measured "
      "from the moment each request was due).")
    w("- Tokens: ES256 JWTs minted by the fake IdP, client and issued tokens alike padded to the "
      "size in Settings (`token_bytes`, about a Keycloak access token). Cache hit: a few hundred tokens, each sent once "
      "before measuring. Cache miss: every request carries a token never seen before, so it is "
      "fully validated and exchanged (the IdP waits 5 ms per exchange); the IdP's call count per "
      "run is listed under Runs.")
    w("- The proxy runs its default configuration: JSON access log on (to /dev/null), metrics on. "
      "The diagnostic row turns the access log off (`log.level: warn`). Envoy validates the same "
      "tokens with `jwt_authn` (local JWKS, `forward: false`, JWT cache sized to hold them) and "
      "writes no access log.")
    if other:
        w(f"- This machine is shared: other processes used {min(other):.0f}–{max(other):.0f}% of the "
          "proxy core during the runs (column \"other load\"), which lowers requests/s and inflates "
          "CPU/request; `bash benches/profile.sh` counts instructions per request instead, which no "
          "neighbour can disturb.")
    profile_md = os.path.join(a.out_dir, "profile.md")
    profile = None
    if os.path.exists(profile_md):
        w("")
        w(open(profile_md).read().rstrip("\n").replace("# Instructions per request", "## Instructions per request", 1))
        profile_json = os.path.join(a.out_dir, "profile.json")
        if os.path.exists(profile_json):
            profile = json.load(open(profile_json))
    md = "\n".join(out) + "\n"

    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out_dir, "latest.json"), "w") as f:
        json.dump({
            "date": now,
            "machine": {"nproc": a.nproc, "cpu_model": a.cpu_model, "kernel": a.kernel},
            "settings": a.settings,
            "source": a.proxy_version,
            "cases": cases,
            "single_flight": single,
            "memory": memory,
            "memory_short_tokens": memory_short,
            "startup": startup,
            "envoy_jwt_stats": envoy_stats,
            "instructions": profile,
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        }, f, indent=2)
        f.write("\n")
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
