#!/usr/bin/env python3
"""Verdicts and summaries of benches/soak.sh and benches/chaos.sh (README "Reliability").

    reliability.py soak SOAK.json --drain DRAIN.json --access-log FILE --warm-lines N
                   --exit-code CODE --drain-delay S --drain-timeout S --summary OUT.md
    reliability.py chaos CHAOS.jsonl --summary OUT.md

Prints the figures, writes them as markdown to --summary, and exits 1 when a check fails
(each failed check is printed).
"""

import argparse
import json
import sys

# The thresholds of README "Reliability".
MAX_STALL_MS = 1000
# The window at the end of the load over which memory must be flat: 30 s, or half the load
# when it is shorter (the short run of `make test`).
LAST_WINDOW_S = 30
MAX_LATE_GROWTH = 0.05
MAX_END_GROWTH = 0.10
# The pooled connections to the backend and the IdP may differ by a few between two moments.
FD_SLACK = 4
# Background tasks (cache housekeeping, pooled connections) may differ by a few.
TASK_SLACK = 8


def mib(kib):
    return "%.1f MiB" % (kib / 1024) if kib is not None else "-"


def soak_checks(s, args, failures):
    settings = s["settings"]
    posts, streams = s["posts"], s["streams"]
    expected_posts = settings["rate"] * settings["duration"]
    if posts["responses"] != expected_posts:
        failures.append("soak: %d POST responses of %d sent" % (posts["responses"], expected_posts))
    if set(posts["statuses"]) - {"200"}:
        failures.append("soak: POST statuses other than 200: %s" % posts["statuses"])
    if posts["errors_before_close"]:
        failures.append("soak: %d POSTs failed" % posts["errors_before_close"])
    n = settings["streams"]
    if streams["opened"] != n or streams["complete"] != n or streams["failed"]:
        failures.append("soak: streams opened %d, complete %d, failed %d of %d"
                        % (streams["opened"], streams["complete"], streams["failed"], n))
    if streams["out_of_order"]:
        failures.append("soak: %d streams had events out of order" % streams["out_of_order"])
    if streams["events"] != n * settings["events"]:
        failures.append("soak: %d events of %d" % (streams["events"], n * settings["events"]))
    if streams["max_gap_ms"] > MAX_STALL_MS:
        failures.append("soak: a stream was silent for %.0f ms" % streams["max_gap_ms"])
    stuck = {k: v for k, v in s["churn"].items() if k.endswith("/stuck") or k.endswith("/connect_error")}
    if stuck:
        failures.append("soak: hostile connections stuck or refused: %s" % stuck)
    slow = s["slowloris_until_closed"]
    if slow["not_closed"]:
        failures.append("soak: %d slowloris connections were never closed" % slow["not_closed"])

    samples = [x for x in s["samples"] if x.get("rss_kib")]
    load_end = s["load_secs"]
    during = [x for x in samples if x["t"] <= load_end]
    last = min(LAST_WINDOW_S, settings["duration"] / 2)
    window = [x for x in during if x["t"] >= load_end - last - 1]
    before, after = s["before"], s["after"]
    start_rss = before["rss_kib"]
    peak = max((x["rss_kib"] for x in samples), default=0)
    late_growth = None
    if len(window) >= 2:
        first, final = window[0]["rss_kib"], window[-1]["rss_kib"]
        late_growth = (final - first) / first
        if late_growth >= MAX_LATE_GROWTH:
            failures.append("soak: resident memory grew %.1f %% over the last %d s"
                            % (late_growth * 100, last))
    end_growth = (after["rss_kib"] - start_rss) / start_rss
    if end_growth > MAX_END_GROWTH:
        failures.append("soak: resident memory ended %.1f %% above its start (%s -> %s)"
                        % (end_growth * 100, mib(start_rss), mib(after["rss_kib"])))
    if after["fds"] > before["fds"] + FD_SLACK:
        failures.append("soak: file descriptors %d before, %d after" % (before["fds"], after["fds"]))
    if after["open_connections"] != before["open_connections"]:
        failures.append("soak: open connections %s before, %s after"
                        % (before["open_connections"], after["open_connections"]))
    if after["runtime_tasks"] > before["runtime_tasks"] + TASK_SLACK:
        failures.append("soak: runtime tasks %s before, %s after"
                        % (before["runtime_tasks"], after["runtime_tasks"]))
    if after.get("backend_streams_open"):
        failures.append("soak: %s streams still open at the backend" % after["backend_streams_open"])
    return {
        "start": start_rss, "peak": peak, "end": after["rss_kib"],
        "late_growth": late_growth, "end_growth": end_growth, "last": last,
        "peak_connections": max((x.get("open_connections") or 0 for x in samples), default=0),
        "peak_fds": max((x.get("fds") or 0 for x in samples), default=0),
        "peak_anon": max((x.get("rss_anon_kib") or 0 for x in samples), default=None),
    }


def drain_checks(d, args, failures):
    posts, streams = d["posts"], d["streams"]
    if posts["errors_before_close"]:
        failures.append("drain: %d requests sent before the listener closed failed"
                        % posts["errors_before_close"])
    if set(posts["statuses"]) - {"200"}:
        failures.append("drain: statuses other than 200: %s" % posts["statuses"])
    n = d["settings"]["streams"]
    if streams["failed"] or streams["out_of_order"] or streams["complete"] != n:
        failures.append("drain: streams complete %d, failed %d, out of order %d of %d"
                        % (streams["complete"], streams["failed"], streams["out_of_order"], n))
    if streams["end_after_close_ms"] > args.drain_timeout * 1000:
        failures.append("drain: a stream ended %d ms after the listener closed"
                        % streams["end_after_close_ms"])
    if str(args.exit_code) != "0":
        failures.append("drain: exit code %s" % args.exit_code)
    lines, statuses, bodies = 0, {}, {}
    with open(args.access_log, encoding="utf-8") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("target") != "access":
                continue
            lines += 1
            if lines <= args.warm_lines:
                continue
            statuses[str(line.get("status"))] = statuses.get(str(line.get("status")), 0) + 1
            bodies[line.get("body")] = bodies.get(line.get("body"), 0) + 1
    logged = lines - args.warm_lines
    if logged != d["responses"]:
        failures.append("drain: %d access lines for %d responses received" % (logged, d["responses"]))
    if set(statuses) - {"200"}:
        failures.append("drain: access lines with status other than 200: %s" % statuses)
    return {"access_lines": logged, "access_statuses": statuses, "access_bodies": bodies}


def soak(args):
    failures = []
    with open(args.soak, encoding="utf-8") as f:
        s = json.load(f)
    with open(args.drain, encoding="utf-8") as f:
        d = json.load(f)
    mem = soak_checks(s, args, failures)
    dr = drain_checks(d, args, failures)
    st, po, b, a = s["settings"], s["posts"], s["before"], s["after"]
    out = [
        "| soak | figure |",
        "|---|---|",
        "| load | %d streams x %d events (every %d ms), %d POSTs/s for %d s over %d tokens, %d hostile connections |"
        % (st["streams"], st["events"], st["gap_ms"], st["rate"], st["duration"], st["tokens"], st["churn"]),
        "| POSTs | %d answered in %.1f s (%.0f/s), statuses %s, %d failed; wait from due time p50 %.1f ms, p99 %.1f ms, max %.1f ms |"
        % (po["responses"], po.get("secs", 0), po["responses"] / max(po.get("secs", 0), 1e-9),
           po["statuses"], po["errors_before_close"], po["p50_us"] / 1e3,
           po["p99_us"] / 1e3, po["max_us"] / 1e3),
        "| streams | %d opened, %d complete, %d failed, %d out of order; %d events; longest silence %.0f ms |"
        % (s["streams"]["opened"], s["streams"]["complete"], s["streams"]["failed"],
           s["streams"]["out_of_order"], s["streams"]["events"], s["streams"]["max_gap_ms"]),
        "| hostile connections | %s |" % ", ".join("%s %d" % kv for kv in sorted(s["churn"].items())),
        "| slowloris held until closed | %d, closed by the proxy after at most %.1f s, %d never |"
        % (s["slowloris_until_closed"]["n"], s["slowloris_until_closed"]["closed_after_ms_max"] / 1e3,
           s["slowloris_until_closed"]["not_closed"]),
        "| resident memory | start %s, peak %s, end %s (%+.1f %%, %.0f s after the load); last %d s of load %s |"
        % (mib(mem["start"]), mib(mem["peak"]), mib(mem["end"]), mem["end_growth"] * 100,
           s.get("settle_secs", 0) + s.get("memory_settle_secs", 0), mem["last"],
           "-" if mem["late_growth"] is None else "%+.1f %%" % (mem["late_growth"] * 100)),
        "| of which anonymous (heap, stacks) | start %s, peak %s, end %s; file-backed (code) %s → %s |"
        % (mib(b.get("rss_anon_kib")), mib(mem["peak_anon"]), mib(a.get("rss_anon_kib")),
           mib(b.get("rss_file_kib")), mib(a.get("rss_file_kib"))),
        "| proxy CPU time | %s |" % ("-" if b.get("cpu_secs") is None or a.get("cpu_secs") is None
                                    else "%.1f s" % (a["cpu_secs"] - b["cpu_secs"])),
        "| file descriptors | %s before, peak %s, %s after |" % (b["fds"], mem["peak_fds"], a["fds"]),
        "| open connections (gauge) | %s before, peak %s, %s after |"
        % (b["open_connections"], mem["peak_connections"], a["open_connections"]),
        "| runtime tasks (gauge) | %s before, %s after |" % (b["runtime_tasks"], a["runtime_tasks"]),
        "",
        "| drain | figure |",
        "|---|---|",
        "| load | %d endless streams, %d POSTs/s; SIGTERM at %.0f s, drain_delay %d s, shutdown.timeout %d s |"
        % (d["settings"]["streams"], d["settings"]["rate"], args.drain_sigterm or 0, args.drain_delay,
           args.drain_timeout),
        "| requests answered | %d (statuses %s); %d failed before the listener closed; %d refused after |"
        % (d["posts"]["responses"], d["posts"]["statuses"], d["posts"]["errors_before_close"],
           d["posts"]["refused_after_close"]),
        "| streams | %d ended cleanly, %d failed, %d out of order; last one %d ms after the listener closed |"
        % (d["streams"]["complete"], d["streams"]["failed"], d["streams"]["out_of_order"],
           d["streams"]["end_after_close_ms"]),
        "| exit code | %s |" % args.exit_code,
        "| access lines | %d for %d responses; statuses %s; bodies %s |"
        % (dr["access_lines"], d["responses"], dr["access_statuses"], dr["access_bodies"]),
    ]
    return out, failures


def chaos(args):
    failures = []
    out = [
        "| fault | requests | cached tokens | new tokens | worst wait (bound) | IdP calls | circuit closed after | RSS start → end |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    with open(args.soak, encoding="utf-8") as f:
        phases = [json.loads(line) for line in f if line.strip()]
    for p in phases:
        worst = max(p["worst_ms"].values()) if p["worst_ms"] else 0
        out.append("| %s | %d | %s | %s | %.0f ms (%d ms) | %d | %s | %s → %s |" % (
            p["fault"], p["requests"],
            ", ".join("%s: %d" % kv for kv in p["statuses"].get("cached", {}).items()),
            ", ".join("%s: %d" % kv for kv in p["statuses"].get("new", {}).items()),
            worst, p["bound_ms"], p["idp_calls"],
            "-" if p["recovered_ms"] is None else "%.1f s" % (p["recovered_ms"] / 1e3),
            mib(p["rss_kib"]["start"]), mib(p["rss_kib"]["end"])))
    if not phases:
        failures.append("chaos: no phase ran")
    return out, failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["soak", "chaos"])
    ap.add_argument("soak")
    ap.add_argument("--drain")
    ap.add_argument("--access-log")
    ap.add_argument("--warm-lines", type=int, default=0)
    ap.add_argument("--exit-code", default="0")
    ap.add_argument("--drain-delay", type=int, default=0)
    ap.add_argument("--drain-timeout", type=int, default=0)
    ap.add_argument("--drain-sigterm", type=float, default=None)
    ap.add_argument("--summary")
    args = ap.parse_args()
    out, failures = soak(args) if args.kind == "soak" else chaos(args)
    text = "\n".join(out) + "\n"
    print(text)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(text)
    for failure in failures:
        print("FAILED: " + failure, file=sys.stderr)
    print("%s: %d checks failed" % (args.kind, len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
