"""Backend A: an MCP server (official Python SDK, FastMCP) protected by bearer tokens.

It stands for the unmodified backend behind the proxy. Every request must carry a JWT
signed by an accepted issuer (`--issuer`, repeatable; keys from that issuer's JWKS, found
through its metadata), with `iss` equal to that issuer, not expired, and an `aud` that contains one of the accepted
audiences. By default the only accepted audience is the server's own URL
(http://HOST:PORT/mcp), which is what the identity provider puts into a token that was
exchanged with `resource` (or `audience`) set to that URL.

For the passthrough test the accepted audiences can be replaced with
`--accept-audience VALUE` (repeatable) or the environment variable
BACKEND_A_ACCEPT_AUDIENCE (space separated), e.g. the proxy's own resource URL, which
is the audience of the client's token.

Tools:
  whoami            the verified claims of the token this server received
  progress(steps, interval_ms)
                    sends `steps` progress notifications `interval_ms` apart, then returns
                    the emission time of each (time.time(), same host as the client)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.request
from typing import Any

import anyio
import jwt
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.fastmcp import Context, FastMCP

log = logging.getLogger("backend_a")

ALGORITHMS = ["ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"]


def discover_jwks_uri(issuer: str, timeout: float = 5.0) -> str:
    """Read the issuer's metadata (RFC 8414, then OIDC discovery) and return jwks_uri."""
    errors = []
    for suffix in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        url = issuer.rstrip("/") + suffix
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
                meta = json.load(resp)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{url}: {exc}")
            continue
        if meta.get("issuer") != issuer:
            errors.append(f"{url}: issuer {meta.get('issuer')!r} != {issuer!r}")
            continue
        if meta.get("jwks_uri"):
            return meta["jwks_uri"]
        errors.append(f"{url}: no jwks_uri")
    raise RuntimeError("cannot discover jwks_uri: " + "; ".join(errors))


class JwksTokenVerifier:
    """Verifies JWT bearer tokens against the JWKS of the issuer their `iss` names."""

    def __init__(self, issuers: list[str], audiences: list[str]) -> None:
        self.audiences = audiences
        self.jwks = {
            issuer: jwt.PyJWKClient(discover_jwks_uri(issuer), cache_keys=True, lifespan=300, timeout=5)
            for issuer in issuers
        }

    def _decode(self, token: str) -> dict[str, Any]:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        if issuer not in self.jwks:
            raise jwt.InvalidIssuerError(f"issuer {issuer!r} is not accepted")
        key = self.jwks[issuer].get_signing_key_from_jwt(token)
        return jwt.decode(
            token,
            key.key,
            algorithms=ALGORITHMS,
            audience=self.audiences,
            issuer=issuer,
            leeway=5,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = await anyio.to_thread.run_sync(self._decode, token)
        except Exception as exc:  # noqa: BLE001 - any failure means: not a valid token
            log.warning("token rejected: %s", exc)
            return None
        act = claims.get("act")
        log.info(
            "token accepted: sub=%s aud=%s act=%s jti=%s",
            claims.get("sub"),
            claims.get("aud"),
            json.dumps(act) if act else None,
            claims.get("jti"),
        )
        scope = claims.get("scope") or ""
        aud = claims.get("aud")
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or claims.get("azp") or claims.get("sub")),
            scopes=scope.split() if isinstance(scope, str) else list(scope),
            expires_at=int(claims["exp"]),
            resource=aud if isinstance(aud, str) else None,
            subject=claims.get("sub"),
            claims=claims,
        )


def build_server(host: str, port: int, issuers: list[str], audiences: list[str]) -> FastMCP:
    own_url = f"http://{host}:{port}/mcp"
    mcp = FastMCP(
        name="backend-a",
        host=host,
        port=port,
        token_verifier=JwksTokenVerifier(issuers, audiences),
        auth=AuthSettings(
            issuer_url=issuers[0],
            resource_server_url=own_url,
            validate_token_resource=False,  # the verifier checks `aud` itself
        ),
        log_level="INFO",
    )

    @mcp.tool()
    async def whoami() -> dict[str, Any]:
        """Return the verified claims of the bearer token this server received."""
        token = get_access_token()
        if token is None:
            raise RuntimeError("no access token in context")
        claims = dict(token.claims or {})
        keys = ("iss", "sub", "aud", "act", "scope", "client_id", "jti", "exp", "iat", "may_act")
        result = {k: claims[k] for k in keys if k in claims}
        result["accepted_audiences"] = audiences
        return result

    @mcp.tool()
    async def progress(ctx: Context, steps: int = 5, interval_ms: int = 300) -> dict[str, Any]:
        """Send `steps` progress notifications `interval_ms` apart, then return their emission times."""
        steps = max(1, min(int(steps), 50))
        interval = max(0, min(int(interval_ms), 5000)) / 1000.0
        emitted: list[float] = []
        for i in range(1, steps + 1):
            emitted.append(time.time())
            await ctx.report_progress(i, steps, f"step {i}/{steps}")
            if i < steps:
                await asyncio.sleep(interval)
        await asyncio.sleep(interval)
        return {"steps": steps, "interval_ms": int(interval * 1000), "emitted_at": emitted, "t_return": time.time()}

    return mcp


def main() -> int:
    p = argparse.ArgumentParser(description="Backend A: bearer-protected MCP server for the e2e suite")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--issuer", action="append", required=True,
                   help="issuer of accepted tokens (exact `iss`; repeatable)")
    p.add_argument(
        "--accept-audience",
        action="append",
        default=None,
        help="accepted `aud` value (repeatable); default: this server's URL http://HOST:PORT/mcp",
    )
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    audiences = args.accept_audience
    if not audiences and os.environ.get("BACKEND_A_ACCEPT_AUDIENCE"):
        audiences = os.environ["BACKEND_A_ACCEPT_AUDIENCE"].split()
    if not audiences:
        audiences = [f"http://{args.host}:{args.port}/mcp"]
    log.info("backend-a on http://%s:%d/mcp, issuers %s, accepted audiences %s", args.host, args.port, args.issuer, audiences)
    server = build_server(args.host, args.port, args.issuer, audiences)
    server.run(transport="streamable-http")
    return 0


if __name__ == "__main__":
    sys.exit(main())
