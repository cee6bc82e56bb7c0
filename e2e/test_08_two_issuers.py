"""8. Two issuers behind one proxy: each client's token is exchanged at its own IdP.

Two authgent-server instances stand for two identity providers (say a company's and a
partner's). The proxy has a profile for each; Backend A accepts tokens of both. A token of
each goes through the proxy with an official MCP SDK client; each IdP's own audit log shows
the one exchange it made, and the other IdP none for that token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

import harness
from checks import accepted, client_ok
from conftest import BACKEND_A_SCOPE, CLIENT_SCOPE
from harness import BackendA, Client, Idp, jwt_claims


@pytest.fixture(scope="module")
def partner_idp(workdir: Path) -> Iterator[Idp]:
    server = Idp(workdir, name="partner-idp")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def two_issuer_backend(workdir: Path, idp: Idp, partner_idp: Idp) -> Iterator[BackendA]:
    server = BackendA(workdir, idp, name="backend-two-issuers", more_idps=[partner_idp])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def profile(name: str, idp: Idp, proxy_client: Client, resource: str, backend: BackendA,
            secret_file: Path) -> dict:
    secret_file.write_text(proxy_client.client_secret)
    secret_file.chmod(0o600)
    return {
        "name": name,
        "inbound": {"issuer": idp.url, "audiences": [resource]},
        "exchange": {
            "client_id": proxy_client.client_id,
            "client_auth": {"method": "client_secret_basic", "secret_file": str(secret_file)},
            "scope": BACKEND_A_SCOPE,
            "resource": [backend.mcp_url],
        },
    }


def test_each_issuers_token_is_exchanged_at_its_own_idp(make_proxy, workdir, idp, mcp_client, proxy_client,
                                                          partner_idp, two_issuer_backend):
    partner_mcp = partner_idp.register("e2e-partner-mcp-client", ["client_credentials"], CLIENT_SCOPE,
                                       "client_secret_basic")
    partner_proxy = partner_idp.register("e2e-partner-token-exchange-proxy", [harness.TOKEN_EXCHANGE],
                                         CLIENT_SCOPE, "client_secret_basic")
    port = harness.free_port()
    resource = f"http://{harness.LOOPBACK}:{port}/mcp"
    secrets = workdir / "two-issuers-secrets"
    secrets.mkdir(exist_ok=True)
    config = {
        "mode": "exchange",
        "upstream": {"url": two_issuer_backend.url},
        "profiles": [
            profile("corp", idp, proxy_client, resource, two_issuer_backend, secrets / "corp"),
            profile("partner", partner_idp, partner_proxy, resource, two_issuer_backend, secrets / "partner"),
        ],
    }
    proxy = make_proxy("two-issuers", config, port=port)

    corp_token = idp.client_token(mcp_client, resource=proxy.mcp_url)
    partner_token = partner_idp.client_token(partner_mcp, resource=proxy.mcp_url)
    accepted(proxy.mcp_url, corp_token)
    accepted(proxy.mcp_url, partner_token)
    runs = {
        "corp": client_ok(harness.run_py_client(proxy.mcp_url, token=corp_token, whoami_calls=5)),
        "partner": client_ok(harness.run_ts_client(proxy.mcp_url, token=partner_token, whoami_calls=5)),
    }
    for name, issuer, actor in (("corp", idp, proxy_client), ("partner", partner_idp, partner_proxy)):
        who = runs[name]["whoami"]
        # Exchanged at its own IdP: that IdP's issuer, the proxy's client there as the actor.
        assert who["iss"] == issuer.url, (name, who)
        assert who["act"] == {"sub": f"client:{actor.client_id}"}, (name, who)
        assert who["aud"] == two_issuer_backend.mcp_url, (name, who)
        assert len(runs[name]["whoami_jtis"]) == 1, (name, runs[name])

    # Each IdP's audit log: one exchange for its own client's token, none for the other's.
    counts = {
        "corp IdP, corp token": len(idp.exchanges_of(proxy_client, corp_token)),
        "partner IdP, partner token": len(partner_idp.exchanges_of(partner_proxy, partner_token)),
        "partner IdP, all exchanges": len(partner_idp.audit("token.exchanged")),
    }
    corp_jti = jwt_claims(corp_token)["jti"]
    counts["corp IdP, partner token"] = len(
        [e for e in idp.audit("token.exchanged")
         if (e.get("metadata") or {}).get("parent_jti") == jwt_claims(partner_token)["jti"]]
    )
    harness.log(f"two issuers: IdP exchange calls {counts}")
    assert counts == {
        "corp IdP, corp token": 1,
        "partner IdP, partner token": 1,
        "partner IdP, all exchanges": 1,
        "corp IdP, partner token": 0,
    }, counts
    assert corp_jti != jwt_claims(partner_token)["jti"]

    text = proxy.metrics_text()
    for name in ("corp", "partner"):
        assert harness.metric_value(text, "txp_exchange_requests_total", result="success", profile=name) == 1, text
        assert harness.metric_value(text, "txp_exchange_requests_total", profile=name) == 1, text
