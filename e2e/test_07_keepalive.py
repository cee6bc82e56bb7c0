"""7. Backend keep-alive: calls spaced at uvicorn's own keep-alive timeout never fail.

Backend A runs on uvicorn, which closes a keep-alive connection after 5 s of silence. A proxy
that keeps idle backend connections longer reuses some of them just as uvicorn closes them,
and those requests fail with 502. With `upstream.pool_idle_timeout` (default 1 s) the proxy
lets go of an idle connection long before uvicorn does.
"""

from __future__ import annotations

import time

import httpx

from checks import INIT, MCP_HEADERS

CALLS = 6
GAP_S = 5.0


def test_calls_every_five_seconds_all_succeed(shared_proxy, idp, mcp_client):
    token = idp.client_token(mcp_client, resource=shared_proxy.mcp_url)
    headers = dict(MCP_HEADERS, Authorization=f"Bearer {token}")
    errors_before = shared_proxy.metric("txp_upstream_errors_total")
    statuses = []
    with httpx.Client(timeout=httpx.Timeout(15.0), trust_env=False) as c:
        for i in range(CALLS):
            r = c.post(shared_proxy.mcp_url, json=INIT, headers=headers)
            statuses.append(r.status_code)
            if i + 1 < CALLS:
                time.sleep(GAP_S)
    assert statuses == [200] * CALLS, statuses
    errors = shared_proxy.metric("txp_upstream_errors_total") - errors_before
    assert errors == 0, f"upstream errors during the calls: {errors}"
