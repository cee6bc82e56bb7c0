"""9. Token lifetime against authgent: refresh ahead, and the online self-check.

- A client token kept in use across the cache's refresh window costs exactly two exchanges at
  authgent (its audit log), and no MCP call fails or waits for the second: the refresh happens
  in the background while requests are served the current entry.
- `check-config --online` probes authgent's token endpoint with the proxy's credentials: a wrong
  client secret exits 69 naming the token endpoint, the right one exits 0; the secret is never
  printed.
"""

from __future__ import annotations

import subprocess
import time

import yaml

import harness
from checks import accepted, client_ok
from conftest import exchange_config

# Serving window 16 s - 1 s; the refresh window starts 4 s before its end, at 11 s. The
# refreshed entry's own refresh window would start 11 s after it, at 22 s or later.
CACHE = {"max_ttl": "16s", "expiry_margin": "1s", "refresh_ahead": "4s"}
# Keep using the token until this long after the first exchange (past 11 s, well before 22 s).
IN_USE = 12.5


def test_a_token_in_use_across_the_refresh_window_costs_two_exchanges(make_proxy, idp, mcp_client,
                                                                       proxy_client, backend_a):
    cfg = exchange_config(idp, proxy_client, backend_a.url, resource=[backend_a.mcp_url])
    cfg["cache"] = CACHE
    proxy = make_proxy("refresh", cfg, secret=proxy_client.client_secret)
    token = idp.client_token(mcp_client, resource=proxy.mcp_url)

    accepted(proxy.mcp_url, token)  # the first exchange, at t = 0
    started = time.monotonic()
    jtis: list[str] = []
    runs = 0
    # Whole MCP sessions (initialize, list tools, whoami) with the official Python SDK until
    # well past the refresh window's start, and within the refreshed entry's serving window.
    # Between sessions, raw initialize calls keep the token in steady use.
    raw = 0
    while time.monotonic() - started < IN_USE and runs < 20:
        out = client_ok(harness.run_py_client(proxy.mcp_url, token=token, whoami_calls=1))
        jtis.extend(out["whoami_jtis"])
        runs += 1
        for _ in range(3):
            accepted(proxy.mcp_url, token)
            raw += 1
    assert runs >= 2, runs
    # The refresh runs in the background: once it has landed (bounded wait), one more session
    # must be served the refreshed token, still well before its own refresh window.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and harness.metric_value(
            proxy.metrics_text(), "txp_exchange_refreshes_total", result="success") < 1:
        time.sleep(0.1)
    out = client_ok(harness.run_py_client(proxy.mcp_url, token=token, whoami_calls=1))
    jtis.extend(out["whoami_jtis"])
    runs += 1

    exchanges = idp.exchanges_of(proxy_client, token)
    harness.log(f"refresh ahead: {runs} MCP sessions and {raw} initialize calls over {time.monotonic() - started:.1f} s, "
                f"{len(exchanges)} exchanges at authgent, backend saw jtis {sorted(set(jtis))}")
    assert len(exchanges) == 2, exchanges
    # The backend was handed the first token, then the refreshed one; nothing else.
    assert len(set(jtis)) == 2, jtis
    assert {e["metadata"]["jti"] for e in exchanges} == set(jtis)
    text = proxy.metrics_text()
    assert harness.metric_value(text, "txp_exchange_refreshes_total", result="success") == 1, text
    assert harness.metric_value(text, "txp_exchange_requests_total", result="success") == 2, text


def _check_online(txp_bin, workdir, idp, proxy_client, backend_a, secret: str, name: str):
    d = workdir / f"online-{name}"
    d.mkdir(parents=True, exist_ok=True)
    secret_file = d / "client-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    cfg = exchange_config(idp, proxy_client, backend_a.url, resource=[backend_a.mcp_url])
    cfg["inbound"]["audiences"] = ["http://127.0.0.1:1/mcp"]
    cfg["exchange"]["client_auth"]["secret_file"] = str(secret_file)
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run([str(txp_bin), "check-config", "--online", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_check_config_online_against_authgent(txp_bin, workdir, idp, proxy_client, backend_a):
    wrong = _check_online(txp_bin, workdir, idp, proxy_client, backend_a, "not-the-secret-x9", "wrong")
    assert wrong.returncode == 69, (wrong.returncode, wrong.stdout, wrong.stderr)
    failures = [line for line in wrong.stderr.splitlines() if line.startswith("online check failed:")]
    assert len(failures) == 1 and failures[0].startswith("online check failed: token_endpoint:"), wrong.stderr
    assert "not-the-secret-x9" not in wrong.stdout + wrong.stderr
    harness.log(f"check-config --online, wrong secret: exit {wrong.returncode}: {failures[0]}")

    right = _check_online(txp_bin, workdir, idp, proxy_client, backend_a, proxy_client.client_secret, "right")
    assert right.returncode == 0, (right.returncode, right.stdout, right.stderr)
    assert "online check failed" not in right.stderr, right.stderr
    assert proxy_client.client_secret not in right.stdout + right.stderr
