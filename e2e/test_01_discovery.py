"""1. From nothing to a tool call: 401 → RFC 9728 metadata → the IdP → a token → proceed."""

from __future__ import annotations

import re

import harness
from checks import accepted, client_ok, post_initialize
from harness import jwt_claims


def test_discovery_by_hand_then_tool_call(shared_proxy, idp, mcp_client):
    proxy = shared_proxy

    # No token: 401 naming the metadata URL.
    r = post_initialize(proxy.mcp_url, None)
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    challenge = r.headers.get("www-authenticate", "")
    assert re.match(r"(?i)bearer\b", challenge), challenge
    m = re.search(r'resource_metadata="([^"]+)"', challenge)
    assert m, f"no resource_metadata in WWW-Authenticate: {challenge!r}"
    metadata_url = m.group(1)
    assert metadata_url.startswith(proxy.url + "/.well-known/oauth-protected-resource"), metadata_url

    # The metadata, served by the proxy without a token, at both RFC 9728 locations.
    with harness.http() as c:
        meta = c.get(metadata_url)
        assert meta.status_code == 200, meta.text
        assert meta.headers["content-type"].startswith("application/json")
        doc = meta.json()
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            other = c.get(proxy.url + path)
            assert other.status_code == 200, f"{path}: {other.status_code}"
            assert other.json() == doc, path
    assert doc["resource"] == proxy.mcp_url
    assert idp.url in doc["authorization_servers"]

    # The authorization server's own metadata (RFC 8414) names its token endpoint.
    issuer = doc["authorization_servers"][0]
    with harness.http() as c:
        as_meta = c.get(issuer.rstrip("/") + "/.well-known/oauth-authorization-server").json()
    assert as_meta["issuer"] == issuer
    token_endpoint = as_meta["token_endpoint"]

    # client_credentials for the proxy's resource.
    with harness.http() as c:
        t = c.post(token_endpoint, data={"grant_type": "client_credentials", "resource": doc["resource"]},
                   auth=(mcp_client.client_id, mcp_client.client_secret))
    assert t.status_code == 200, t.text
    token = t.json()["access_token"]
    claims = jwt_claims(token)
    assert claims["aud"] == proxy.mcp_url

    # And proceed.
    accepted(proxy.mcp_url, token)
    out = client_ok(harness.run_py_client(proxy.mcp_url, token=token))
    assert out["whoami"]["sub"] == claims["sub"]


def test_python_sdk_discovers_by_itself(shared_proxy, idp, mcp_client):
    """The SDK's own client_credentials provider follows the proxy's 401 and metadata."""
    out = client_ok(harness.run_py_client(shared_proxy.mcp_url, client=mcp_client, issuer=idp.url))
    assert jwt_claims(out["obtained_token"])["aud"] == shared_proxy.mcp_url
    assert out["whoami"]["sub"] == f"client:{mcp_client.client_id}"


def test_typescript_sdk_discovers_by_itself(shared_proxy, idp, mcp_client):
    out = client_ok(harness.run_ts_client(shared_proxy.mcp_url, client=mcp_client, issuer=idp.url))
    assert jwt_claims(out["obtained_token"])["aud"] == shared_proxy.mcp_url
    assert out["whoami"]["sub"] == f"client:{mcp_client.client_id}"
