"""Fixtures of the end-to-end suite: real peers on loopback, always stopped, logs on failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import BackendA, Client, Idp, Nextcloud, Proxy  # noqa: E402

# Scopes of the MCP client's registration; the proxy's client may request any subset.
CLIENT_SCOPE = "tools:read tools:call openid notes.read notes.write"
# What the proxy asks for in front of Backend A.
BACKEND_A_SCOPE = "tools:read tools:call"


def pytest_configure(config: pytest.Config) -> None:
    harness.interrupt_on_sigterm()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("TXP_E2E_WORKDIR")
    if keep:
        p = Path(keep)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("txp-e2e")


@pytest.fixture(scope="session")
def txp_bin() -> Path:
    path = harness.proxy_binary()
    if not path.exists() or not os.access(path, os.X_OK):
        pytest.fail(f"proxy binary {path} not found or not executable (cargo build, or set TXP_BIN)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def idp(workdir: Path) -> Iterator[Idp]:
    server = Idp(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mcp_client(idp: Idp) -> Client:
    """The MCP client's registration: client_credentials, client_secret_basic."""
    return idp.register("e2e-mcp-client", ["client_credentials"], CLIENT_SCOPE, "client_secret_basic")


@pytest.fixture(scope="session")
def proxy_client(idp: Idp) -> Client:
    """The proxy's registration: token exchange, client_secret_basic."""
    return idp.register("e2e-token-exchange-proxy", [harness.TOKEN_EXCHANGE], CLIENT_SCOPE,
                        "client_secret_basic")


@pytest.fixture(scope="session")
def backend_a(workdir: Path, idp: Idp) -> Iterator[BackendA]:
    server = BackendA(workdir, idp)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def exchange_config(idp: Idp, proxy_client: Client, upstream: str, resource: list[str] | None = None,
                    audience: list[str] | None = None, scope: str = BACKEND_A_SCOPE,
                    port: int | None = None) -> dict:
    """The proxy config of exchange mode, keys as in the README's configuration reference."""
    exchange: dict = {
        "client_id": proxy_client.client_id,
        "client_auth": {"method": "client_secret_basic"},
        "scope": scope,
    }
    if resource:
        exchange["resource"] = resource
    if audience:
        exchange["audience"] = audience
    return {
        "mode": "exchange",
        "upstream": {"url": upstream},
        "inbound": {"issuer": idp.url, "audiences": []},  # filled in by make_proxy
        "exchange": exchange,
    }


@pytest.fixture
def make_proxy(workdir: Path, txp_bin: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    """Start proxies for one test; each is stopped at the end of it (and must exit 0)."""
    started: list[Proxy] = []

    def make(name: str, config: dict, secret: str | None = None, port: int | None = None) -> Proxy:
        port = port or harness.free_port()
        resource = f"http://{harness.LOOPBACK}:{port}/mcp"
        cfg = dict(config)
        if "profiles" not in cfg:  # each profile names its own audiences
            inbound = dict(cfg.get("inbound", {}))
            if not inbound.get("audiences"):
                inbound["audiences"] = [resource]
            cfg["inbound"] = inbound
        cfg.setdefault("protected_resource", {"resource": resource})
        p = Proxy(workdir, f"{request.node.name}-{name}", cfg, port=port, secret=secret)
        started.append(p)
        p.start()
        return p

    yield make
    codes = {p.proc.name: p.stop() for p in reversed(started)}
    bad = {k: v for k, v in codes.items() if v != 0}
    if bad:
        pytest.fail(f"proxy did not exit 0 on SIGTERM: {bad}", pytrace=False)


@pytest.fixture(scope="session")
def shared_proxy(workdir: Path, txp_bin: Path, idp: Idp, proxy_client: Client,
                 backend_a: BackendA) -> Iterator[Proxy]:
    """One exchange-mode proxy in front of Backend A, shared by the read-only tests."""
    port = harness.free_port()
    resource = f"http://{harness.LOOPBACK}:{port}/mcp"
    cfg = exchange_config(idp, proxy_client, backend_a.url, resource=[backend_a.mcp_url])
    cfg["inbound"]["audiences"] = [resource]
    cfg["protected_resource"] = {"resource": resource}
    p = Proxy(workdir, "shared", cfg, port=port, secret=proxy_client.client_secret)
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def nextcloud_oidc_client(idp: Idp) -> Client:
    """nextcloud-mcp-server's own OIDC client: its id is an audience it accepts."""
    return idp.register("e2e-nextcloud-mcp", ["client_credentials"], "openid notes.read notes.write",
                        "client_secret_post")


@pytest.fixture(scope="session")
def nextcloud(workdir: Path, idp: Idp, nextcloud_oidc_client: Client) -> Iterator[Nextcloud]:
    server = Nextcloud(workdir, idp, nextcloud_oidc_client)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On failure, attach the tail of every running peer's log to the report."""
    report = yield
    if report.failed:
        for proc in list(harness.PROCS):
            report.sections.append((f"log of {proc.name} ({proc.log_path})", proc.tail(80)))
    return report
