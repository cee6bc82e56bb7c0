"""MCP client built on the official Python SDK, used by the end-to-end suite.

It talks streamable HTTP to one URL (the proxy, or a backend directly) and prints
one JSON document on stdout describing what happened:

    {"ok": true, "server": {...}, "tools": [...], "whoami": {...},
     "whoami_calls": N, "progress": {"notifications": [...], "result": {...}, ...}}

Token sources:
  --token TOKEN                 a bearer token obtained by the caller
  --client-id/--client-secret   let the SDK discover everything itself: on the 401 it reads
                                the protected resource metadata, finds the authorization
                                server, and obtains a client_credentials token for the resource

Arrival times of progress notifications are recorded with time.time() so that they can
be compared with the emission times the backend reports (same host, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


class MemoryTokenStorage:
    """In-memory token storage for the SDK's OAuth provider."""

    def __init__(self) -> None:
        self.tokens = None
        self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens) -> None:
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info) -> None:
        self.client_info = client_info


def _structured(result: Any) -> Any:
    """The JSON value a tool returned: structured content if any, else parsed text."""
    if getattr(result, "structuredContent", None):
        value = result.structuredContent
        # FastMCP wraps non-object return values as {"result": ...}
        if isinstance(value, dict) and set(value) == {"result"}:
            return value["result"]
        return value
    texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
    joined = "".join(texts)
    try:
        return json.loads(joined)
    except ValueError:
        return joined


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "client": "python-sdk"}
    auth = None
    headers: dict[str, str] = {}
    storage = None
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    elif args.client_id:
        from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider

        storage = MemoryTokenStorage()
        auth = ClientCredentialsOAuthProvider(
            server_url=args.url,
            storage=storage,
            client_id=args.client_id,
            client_secret=args.client_secret,
            token_endpoint_auth_method=args.auth_method,
            scopes=args.scope,
            issuer=args.issuer,
        )
    timeout = httpx.Timeout(args.timeout, read=args.timeout)
    http_client = create_mcp_http_client(headers=headers, timeout=timeout, auth=auth)
    async with http_client:
        async with streamable_http_client(args.url, http_client=http_client) as (read, write, _sid):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["server"] = {
                    "name": init.serverInfo.name,
                    "version": init.serverInfo.version,
                    "protocol_version": init.protocolVersion,
                }
                tools = await session.list_tools()
                out["tools"] = sorted(t.name for t in tools.tools)
                if args.whoami_calls > 0:
                    results = []
                    for _ in range(args.whoami_calls):
                        res = await session.call_tool("whoami", {})
                        if res.isError:
                            raise RuntimeError(f"whoami failed: {res.content!r}")
                        results.append(_structured(res))
                    out["whoami"] = results[0]
                    out["whoami_calls"] = len(results)
                    out["whoami_jtis"] = sorted({r.get("jti") for r in results if isinstance(r, dict)})
                if args.progress_steps > 0:
                    notes: list[dict[str, Any]] = []

                    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                        note = {"t": time.time(), "progress": progress, "total": total, "message": message}
                        notes.append(note)
                        if args.print_progress:
                            print("progress " + json.dumps(note), file=sys.stderr, flush=True)

                    t0 = time.time()
                    res = await session.call_tool(
                        "progress",
                        {"steps": args.progress_steps, "interval_ms": args.progress_interval_ms},
                        progress_callback=on_progress,
                    )
                    t_result = time.time()
                    if res.isError:
                        raise RuntimeError(f"progress failed: {res.content!r}")
                    out["progress"] = {
                        "t_call": t0,
                        "t_result": t_result,
                        "notifications": notes,
                        "result": _structured(res),
                    }
    if storage is not None and storage.tokens is not None:
        out["obtained_token"] = storage.tokens.access_token
    out["ok"] = True
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--client-id", help="discover the authorization server and use client_credentials")
    p.add_argument("--client-secret")
    p.add_argument("--auth-method", default="client_secret_post",
                   choices=["client_secret_post", "client_secret_basic"])
    p.add_argument("--scope", default=None)
    p.add_argument("--issuer", default=None, help="the authorization server the credentials belong to")
    p.add_argument("--whoami-calls", type=int, default=1)
    p.add_argument("--progress-steps", type=int, default=0)
    p.add_argument("--progress-interval-ms", type=int, default=300)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--print-progress", action="store_true",
                   help="also print each progress notification on stderr the moment it arrives")
    args = p.parse_args()
    try:
        out = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout * 2))
    except BaseException as exc:  # noqa: BLE001 - report everything as JSON
        detail = "".join(traceback.format_exception(exc))
        print(json.dumps({"ok": False, "client": "python-sdk", "error": repr(exc), "trace": detail}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
