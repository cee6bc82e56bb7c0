"""The peers among themselves, without the proxy.

These establish that the identity provider, the backends and both SDK clients behave as the
proxy tests assume, so that a failure further on points at the proxy and not at a peer.
"""

from __future__ import annotations

import harness
from checks import accepted, client_ok, post_initialize, progress_streamed
from conftest import BACKEND_A_SCOPE
from harness import jwt_claims

def test_idp_exchange_by_hand(idp, mcp_client, proxy_client):
    """authgent's RFC 8693 exchange: sub kept, aud from resource or audience, act = the actor."""
    client_token = idp.client_token(mcp_client, resource="http://127.0.0.1:1/mcp")
    ct = jwt_claims(client_token)
    assert ct["sub"] == f"client:{mcp_client.client_id}"
    assert ct["aud"] == "http://127.0.0.1:1/mcp"
    assert "act" not in ct

    by_resource = idp.exchange(proxy_client, client_token, scope="tools:read", resource="http://127.0.0.1:2/mcp")
    assert by_resource["issued_token_type"] == harness.ACCESS_TOKEN_TYPE
    assert by_resource["token_type"] == "Bearer"
    rc = jwt_claims(by_resource["access_token"])
    assert rc["sub"] == ct["sub"]
    assert rc["aud"] == "http://127.0.0.1:2/mcp"
    assert rc["act"] == {"sub": f"client:{proxy_client.client_id}"}
    assert rc["scope"] == "tools:read"
    assert rc["client_id"] == proxy_client.client_id

    # `audience` wins over `resource` when both are sent.
    by_both = idp.exchange(proxy_client, client_token, scope="tools:read", resource="http://127.0.0.1:2/mcp",
                           audience="some-backend")
    assert jwt_claims(by_both["access_token"])["aud"] == "some-backend"

    # The audit log records each exchange with the subject token's jti.
    assert len(idp.exchanges_of(proxy_client, client_token)) == 2


def test_backend_a_accepts_exchanged_token_only(idp, mcp_client, proxy_client, backend_a):
    """Backend A with a hand-exchanged token, through both SDK clients; the client token is refused."""
    client_token = idp.client_token(mcp_client, resource="http://127.0.0.1:1/mcp")
    exchanged = idp.exchange(proxy_client, client_token, scope=BACKEND_A_SCOPE, resource=backend_a.mcp_url)
    token = exchanged["access_token"]
    accepted(backend_a.mcp_url, token)

    for run in (harness.run_py_client, harness.run_ts_client):
        out = client_ok(run(backend_a.mcp_url, token=token, progress_steps=3))
        assert out["tools"] == ["progress", "whoami"]
        who = out["whoami"]
        assert who["sub"] == f"client:{mcp_client.client_id}"
        assert who["aud"] == backend_a.mcp_url
        assert who["act"] == {"sub": f"client:{proxy_client.client_id}"}
        progress_streamed(out, steps=3, interval_ms=300)

    r = post_initialize(backend_a.mcp_url, client_token)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    assert post_initialize(backend_a.mcp_url, None).status_code == 401


def test_nextcloud_accepts_exchanged_token_only(idp, mcp_client, proxy_client, nextcloud, nextcloud_oidc_client):
    """nextcloud-mcp-server: a token exchanged for its client id lists tools for its scopes."""
    client_token = idp.client_token(mcp_client, resource="http://127.0.0.1:1/mcp")
    exchanged = idp.exchange(proxy_client, client_token, scope="notes.read",
                             audience=nextcloud_oidc_client.client_id)["access_token"]
    out = client_ok(harness.run_py_client(nextcloud.mcp_url, token=exchanged, whoami_calls=0))
    assert "nc_notes_get_note" in out["tools"]
    assert "nc_notes_create_note" not in out["tools"]

    r = post_initialize(nextcloud.mcp_url, client_token)
    assert r.status_code == 401, r.text


def test_sdk_clients_discover_backend_a_directly(idp, mcp_client, backend_a):
    """Both SDK clients find the IdP from Backend A's own 401 and metadata and get a token.

    The same discovery code then runs against the proxy in test_01.
    """
    for run in (harness.run_py_client, harness.run_ts_client):
        out = client_ok(run(backend_a.mcp_url, client=mcp_client, issuer=idp.url))
        assert jwt_claims(out["obtained_token"])["aud"] == backend_a.mcp_url
        assert out["whoami"]["sub"] == f"client:{mcp_client.client_id}"
