"""A short, readable run of token-exchange-proxy between real peers (`make demo`).

Starts the identity provider (authgent-server), Backend A (an MCP server on the official Python
SDK that accepts only tokens meant for itself) and the proxy in front of it, then drives an MCP
client (official Python SDK) through the proxy and tells what happened. Everything runs on
127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from checks import post_initialize  # noqa: E402
from harness import BackendA, Idp, Proxy, jwt_claims  # noqa: E402

STEPS = 5
INTERVAL_MS = 400


def say(text: str = "") -> None:
    print(text, flush=True)


def section(title: str) -> None:
    say()
    say(f"-- {title}")


def run_client_live(url: str, token: str) -> dict:
    """Run the Python SDK client, echoing progress notifications the moment they arrive."""
    argv = [str(harness.BACKEND_PY), str(harness.PY_CLIENT), "--url", url, "--token", token,
            "--whoami-calls", "3", "--progress-steps", str(STEPS),
            "--progress-interval-ms", str(INTERVAL_MS), "--print-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    t0 = None
    other_stderr = []
    assert proc.stderr is not None and proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # ends when the client exits
        if line.startswith("progress "):
            note = json.loads(line[len("progress "):])
            t0 = t0 or note["t"]
            say(f"   +{note['t'] - t0:5.2f}s  {note['message']}   (arrived {time.strftime('%H:%M:%S', time.localtime(note['t']))}"
                f".{int(note['t'] * 1000) % 1000:03d})")
        else:
            other_stderr.append(line)
        if time.monotonic() > deadline:
            proc.kill()
            break
    out_text = proc.stdout.read()
    proc.wait(timeout=10)
    lines = [ln for ln in out_text.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"ok": False, "error": "no output"}
    if not out.get("ok"):
        out["stderr"] = "".join(other_stderr[-20:])
    return out


def main() -> int:
    harness.interrupt_on_sigterm()
    binary = harness.proxy_binary()
    if not binary.exists():
        say(f"proxy binary {binary} not found: run `cargo build` first (or set TXP_BIN)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="txp-demo-"))
    ok = False
    started: list = []
    try:
        say("token-exchange-proxy demo: client -> proxy -> MCP backend, identity provider beside them")
        idp = Idp(workdir).start()
        started.append(idp)
        mcp_client = idp.register("demo-mcp-client", ["client_credentials"], "tools:read tools:call",
                                  "client_secret_basic")
        proxy_client = idp.register("demo-proxy", [harness.TOKEN_EXCHANGE], "tools:read tools:call",
                                    "client_secret_basic")
        backend = BackendA(workdir, idp).start()
        started.append(backend)
        port = harness.free_port()
        resource = f"http://{harness.LOOPBACK}:{port}/mcp"
        proxy = Proxy(workdir, "demo", {
            "mode": "exchange",
            "upstream": {"url": backend.url},
            "inbound": {"issuer": idp.url, "audiences": [resource]},
            "exchange": {
                "client_id": proxy_client.client_id,
                "client_auth": {"method": "client_secret_basic"},
                "resource": [backend.mcp_url],
                "scope": "tools:read tools:call",
            },
            "protected_resource": {"resource": resource},
        }, port=port, secret=proxy_client.client_secret)
        proxy.start()
        started.append(proxy)

        say(f"   identity provider  {idp.url}   (authgent-server, RFC 8693 token exchange)")
        say(f"   backend            {backend.mcp_url}   (accepts only aud = its own URL)")
        say(f"   proxy              {proxy.mcp_url}   (admin {proxy.admin_url})")
        say(f"   the proxy's client at the identity provider: {proxy_client.client_id}")

        section("1. A client without a token")
        r = post_initialize(proxy.mcp_url, None)
        say(f"   proxy answers {r.status_code}, WWW-Authenticate: {r.headers.get('www-authenticate')}")
        m = re.search(r'resource_metadata="([^"]+)"', r.headers.get("www-authenticate", ""))
        if m:
            with harness.http() as c:
                meta = c.get(m.group(1)).json()
            say(f"   metadata: resource={meta.get('resource')}  authorization_servers={meta.get('authorization_servers')}")

        section("2. The client's token (client_credentials at the identity provider)")
        token = idp.client_token(mcp_client, resource=resource)
        ct = jwt_claims(token)
        say(f"   sub={ct['sub']}")
        say(f"   aud={ct['aud']}   (the proxy, not the backend)")
        r = post_initialize(backend.mcp_url, token)
        say(f"   sent straight to the backend: {r.status_code}")

        section(f"3. MCP through the proxy: whoami x3, then a tool that streams {STEPS} progress notifications")
        out = run_client_live(proxy.mcp_url, token)
        if not out.get("ok"):
            say(f"   the client failed: {out.get('error')}")
            r = post_initialize(proxy.mcp_url, token)
            say(f"   a plain initialize with the token: {r.status_code}, "
                f"WWW-Authenticate: {r.headers.get('www-authenticate')}, body: {r.text[:300]}")
            return 1
        who = out["whoami"]
        say()
        say("   the token the backend saw:")
        say(f"   sub={who.get('sub')}")
        say(f"   aud={who.get('aud')}   (the backend)")
        say(f"   act={json.dumps(who.get('act'))}   (the proxy's client at the identity provider)")
        say(f"   scope={who.get('scope')}")
        prog = out["progress"]
        first = prog["notifications"][0]["t"] if prog["notifications"] else prog["t_result"]
        say(f"   tool result {prog['t_result'] - first:.2f}s after the first notification")

        section("4. The proxy's cache")
        text = proxy.metrics_text()
        for name, labels in (("txp_exchange_requests_total", {"result": "success"}),
                             ("txp_exchange_cache_hits_total", {}),
                             ("txp_exchange_cache_misses_total", {})):
            shown = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
            say(f"   {shown} = {harness.metric_value(text, name, **labels):g}")
        audited = idp.exchanges_of(proxy_client, token)
        say(f"   token exchanges the identity provider recorded for this client token: {len(audited)}")
        ok = True
        return 0
    except harness.PeerError as exc:
        say(f"demo failed: {exc}")
        return 1
    finally:
        for peer in reversed(started):
            peer.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
            say()
            say("stopped everything.")
        else:
            say(f"logs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
