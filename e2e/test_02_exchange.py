"""2. Through the proxy, both official SDK clients reach Backend A with an exchanged token."""

from __future__ import annotations

import pytest

import harness
from checks import accepted, client_ok, post_initialize
from harness import jwt_claims


@pytest.fixture(scope="module")
def client_token(idp, mcp_client, shared_proxy) -> str:
    return idp.client_token(mcp_client, resource=shared_proxy.mcp_url)


@pytest.mark.parametrize("run", [harness.run_py_client, harness.run_ts_client], ids=["python-sdk", "typescript-sdk"])
def test_whoami_shows_exchanged_token(run, shared_proxy, backend_a, client_token, mcp_client, proxy_client):
    accepted(shared_proxy.mcp_url, client_token)
    out = client_ok(run(shared_proxy.mcp_url, token=client_token))
    assert out["server"]["name"] == "backend-a"
    assert out["tools"] == ["progress", "whoami"]
    who = out["whoami"]
    ct = jwt_claims(client_token)
    # The client's identity, the backend as audience, the proxy as actor: exchanged, not forwarded.
    assert who["sub"] == ct["sub"] == f"client:{mcp_client.client_id}"
    assert who["aud"] == backend_a.mcp_url
    assert who["act"] == {"sub": f"client:{proxy_client.client_id}"}
    assert who["client_id"] == proxy_client.client_id
    assert who["jti"] != ct["jti"]
    assert set(who["scope"].split()) == {"tools:read", "tools:call"}


def test_client_token_sent_straight_to_backend_is_rejected(backend_a, client_token):
    r = post_initialize(backend_a.mcp_url, client_token)
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    out = harness.run_py_client(backend_a.mcp_url, token=client_token)
    assert out["ok"] is False and "401" in out["error"], out
