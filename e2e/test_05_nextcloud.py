"""5. nextcloud-mcp-server (unmodified) behind the proxy.

It accepts a token whose `aud` is its OIDC client id (or its URL, or URL + /mcp) and lists only
the tools the token's scopes allow. The proxy exchanges with `audience` = that client id and
scope `notes.read`, narrower than the client token's `notes.read notes.write`.
"""

from __future__ import annotations

import harness
from checks import accepted, client_ok, post_initialize
from conftest import exchange_config

NOTES_READ = {"nc_notes_get_note", "nc_notes_list_notes", "nc_notes_search_notes", "nc_notes_get_attachment"}
NOTES_WRITE = {"nc_notes_create_note", "nc_notes_update_note", "nc_notes_delete_note", "nc_notes_append_content"}


def test_nextcloud_behind_proxy(make_proxy, idp, mcp_client, proxy_client, nextcloud, nextcloud_oidc_client):
    cfg = exchange_config(idp, proxy_client, nextcloud.url, audience=[nextcloud_oidc_client.client_id],
                          scope="notes.read")
    proxy = make_proxy("nextcloud", cfg, secret=proxy_client.client_secret)
    token = idp.client_token(mcp_client, resource=proxy.mcp_url)
    assert {"notes.read", "notes.write"} <= set(harness.jwt_claims(token)["scope"].split())

    accepted(proxy.mcp_url, token)
    out = client_ok(harness.run_py_client(proxy.mcp_url, token=token, whoami_calls=0))
    assert out["server"]["name"] == "Nextcloud MCP"
    tools = set(out["tools"])
    assert NOTES_READ <= tools, sorted(tools)
    assert not (NOTES_WRITE & tools), f"write tools listed with a notes.read token: {sorted(tools)}"
    assert all(t.startswith("nc_notes_") for t in tools), sorted(tools)

    recorded = idp.exchanges_of(proxy_client, token)
    assert [e["metadata"]["audience"] for e in recorded] == [nextcloud_oidc_client.client_id]

    # The client token itself is not for nextcloud-mcp-server.
    r = post_initialize(nextcloud.mcp_url, token)
    assert r.status_code == 401, f"{r.status_code} {r.text}"
