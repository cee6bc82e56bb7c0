"""Assertion helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import httpx

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "e2e-raw", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def post_initialize(url: str, token: str | None) -> httpx.Response:
    """One raw MCP initialize request (no SDK), to see status, headers and body as they are."""
    headers = dict(MCP_HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(timeout=httpx.Timeout(15.0), trust_env=False) as c:
        return c.post(url, json=INIT, headers=headers)


def accepted(url: str, token: str) -> None:
    """A raw initialize with `token` succeeds; on failure the message shows what came back."""
    r = post_initialize(url, token)
    assert r.status_code == 200, (
        f"initialize at {url} answered {r.status_code}, "
        f"WWW-Authenticate: {r.headers.get('www-authenticate')!r}, body: {r.text[:500]!r}"
    )


def client_ok(out: dict[str, Any]) -> dict[str, Any]:
    """The output of a client run that must have succeeded; the failure names the client's error."""
    assert out.get("ok") is True, (
        f"{out.get('client')} failed (exit {out.get('_exit')}): {out.get('error')}\n"
        f"{out.get('trace', '')}\nstderr: {out.get('_stderr', '')}"
    )
    return out


def progress_streamed(out: dict[str, Any], steps: int, interval_ms: int) -> None:
    """Progress notifications reached the client one by one, as the backend emitted them.

    Compares each arrival time with the emission time the backend reported (same host, same
    clock). A proxy that buffers the SSE body delivers everything at the end: the first
    notification then arrives about (steps * interval) late and all gaps collapse to ~0.
    """
    prog = out["progress"]
    notes = prog["notifications"]
    emitted = prog["result"]["emitted_at"]
    interval = interval_ms / 1000.0
    assert [n["progress"] for n in notes] == list(range(1, steps + 1)), f"notifications: {notes}"
    assert len(emitted) == steps
    latencies = [n["t"] - e for n, e in zip(notes, emitted)]
    gaps = [b["t"] - a["t"] for a, b in zip(notes, notes[1:])]
    detail = f"latencies {[round(x, 3) for x in latencies]}, gaps {[round(x, 3) for x in gaps]}"
    # Each notification arrives soon after it was sent (buffering would make the first ~1.5 s late).
    assert max(latencies) < min(0.5, interval * steps / 3), f"notifications arrived late: {detail}"
    # They arrive spread out like they were sent, not in one burst.
    assert min(gaps) > interval / 3, f"notifications arrived in bursts: {detail}"
    # The first one came well before the tool's result.
    assert prog["t_result"] - notes[0]["t"] > interval * (steps - 1), f"first notification too late: {detail}"
