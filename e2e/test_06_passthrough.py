"""6. mode: passthrough: the client token is validated and forwarded unchanged."""

from __future__ import annotations

import harness
from checks import accepted, client_ok, progress_streamed
from harness import BackendA


def test_passthrough_end_to_end(make_proxy, workdir, idp, mcp_client, proxy_client):
    port = harness.free_port()
    resource = f"http://{harness.LOOPBACK}:{port}/mcp"
    # A Backend A that accepts the client token's audience (the proxy's resource).
    backend = BackendA(workdir, idp, name="backend-a-passthrough", accept_audiences=[resource]).start()
    try:
        proxy = make_proxy("passthrough", {
            "mode": "passthrough",
            "upstream": {"url": backend.url},
            "inbound": {"issuer": idp.url, "audiences": [resource]},
            "protected_resource": {"resource": resource},
        }, port=port)
        token = idp.client_token(mcp_client, resource=resource)
        ct = harness.jwt_claims(token)

        accepted(proxy.mcp_url, token)
        for run in (harness.run_py_client, harness.run_ts_client):
            out = client_ok(run(proxy.mcp_url, token=token, whoami_calls=2, progress_steps=3))
            who = out["whoami"]
            assert who["sub"] == ct["sub"]
            assert who["aud"] == resource
            assert who["jti"] == ct["jti"], "the backend did not get the client's token unchanged"
            assert "act" not in who
            progress_streamed(out, steps=3, interval_ms=300)

        assert harness.metric_value(proxy.metrics_text(), "txp_exchange_requests_total") == 0
        assert idp.exchanges_of(proxy_client, token) == []
    finally:
        backend.stop()
