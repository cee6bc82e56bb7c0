"""4. Ten tool calls with one client token cost one exchange, seen from both sides.

The proxy's side is its /metrics. The IdP's side is authgent's own audit log, read through its
`GET /audit` API: every RFC 8693 exchange is recorded as action `token.exchanged` with the
acting client and the subject token's `jti` (`metadata.parent_jti`).
"""

from __future__ import annotations

import harness
from checks import accepted, client_ok
from conftest import exchange_config


def test_ten_calls_one_exchange(make_proxy, idp, mcp_client, proxy_client, backend_a):
    proxy = make_proxy("cache", exchange_config(idp, proxy_client, backend_a.url, resource=[backend_a.mcp_url]),
                       secret=proxy_client.client_secret)
    token = idp.client_token(mcp_client, resource=proxy.mcp_url)
    assert idp.exchanges_of(proxy_client, token) == []

    accepted(proxy.mcp_url, token)  # the first request: the one exchange
    out = client_ok(harness.run_py_client(proxy.mcp_url, token=token, whoami_calls=10))
    assert out["whoami_calls"] == 10
    # The backend saw one and the same exchanged token every time.
    assert len(out["whoami_jtis"]) == 1, out["whoami_jtis"]

    text = proxy.metrics_text()
    success = harness.metric_value(text, "txp_exchange_requests_total", result="success")
    hits = harness.metric_value(text, "txp_exchange_cache_hits_total")
    misses = harness.metric_value(text, "txp_exchange_cache_misses_total")
    others = harness.metric_value(text, "txp_exchange_requests_total") - success
    summary = f"success={success} other_results={others} hits={hits} misses={misses}"
    assert success == 1, summary
    assert others == 0, summary
    assert hits >= 9, summary

    recorded = idp.exchanges_of(proxy_client, token)
    assert len(recorded) == 1, recorded
    assert recorded[0]["metadata"]["audience"] == backend_a.mcp_url
    assert recorded[0]["metadata"]["jti"] == out["whoami_jtis"][0]
