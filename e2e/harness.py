"""Process and peer management for the end-to-end suite and the demo.

Every peer runs as its own process group on a free loopback port, with stdout and stderr in
a log file under a temporary directory. Waits are bounded; stop() always ends the whole
process group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parent
PEERS = Path(os.environ.get("TXP_E2E_PEERS", REPO / ".peers"))
IDP_BIN = PEERS / "idp" / "bin" / "authgent-server"
NEXTCLOUD_BIN = PEERS / "nextcloud" / "bin" / "nextcloud-mcp-server"
BACKEND_PY = PEERS / "backend" / "bin" / "python"
TS_CLIENT = E2E_DIR / "ts-client" / "client.mjs"
PY_CLIENT = E2E_DIR / "client_py.py"

LOOPBACK = "127.0.0.1"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"

# Every process started here, for failure reports and the last-resort cleanup.
PROCS: list["Proc"] = []


def proxy_binary() -> Path:
    """The proxy under test: $TXP_BIN (relative paths are taken from the repository root)."""
    path = Path(os.environ.get("TXP_BIN") or "target/debug/token-exchange-proxy")
    return (path if path.is_absolute() else REPO / path).resolve()


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, without verifying it (for assertions about what was issued)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class PeerError(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    started_at: float = 0.0

    def start(self) -> "Proc":
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() ends children too
        )
        PROCS.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 8.0) -> int | None:
        """SIGTERM the process group, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        # Leftover children of the group (if the leader exited first).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()
        if self in PROCS:
            PROCS.remove(self)
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
        """Poll `check` until it is true; fail early if the process dies; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise PeerError(
                    f"{self.name} exited with {self.popen.returncode if self.popen else '?'} "
                    f"while waiting for {what}\n--- {self.log_path} ---\n{self.tail()}"
                )
            try:
                if check():
                    return
            except (httpx.HTTPError, OSError, ValueError) as exc:
                last_exc = exc
            time.sleep(interval)
        raise PeerError(
            f"{self.name}: {what} not reached within {timeout}s (last error: {last_exc!r})"
            f"\n--- {self.log_path} ---\n{self.tail()}"
        )


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt, so that cleanup code runs."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@atexit.register
def _stop_all() -> None:
    for proc in list(reversed(PROCS)):
        try:
            proc.stop(timeout=3)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def http() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(15.0), trust_env=False)


def _status_is(url: str, codes: tuple[int, ...]) -> Callable[[], bool]:
    def check() -> bool:
        with http() as c:
            return c.get(url).status_code in codes

    return check


# --------------------------------------------------------------------------------------------
# Identity provider: authgent-server


@dataclass
class Client:
    client_id: str
    client_secret: str
    name: str
    scope: str


class Idp:
    """authgent-server on a free loopback port, with a SQLite database in its own directory."""

    def __init__(self, workdir: Path, name: str = "idp") -> None:
        self.dir = workdir / name
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc = Proc(
            name=f"{name} (authgent-server)",
            argv=[str(IDP_BIN), "run", "--host", LOOPBACK, "--port", str(self.port)],
            log_path=workdir / f"{name}.log",
            cwd=self.dir,
            env={
                "AUTHGENT_SERVER_URL": self.url,
                "AUTHGENT_DATABASE_URL": "sqlite+aiosqlite:///./authgent.db",
                "AUTHGENT_TOKEN_RATE_LIMIT": "100000",
                "AUTHGENT_REGISTER_RATE_LIMIT": "100000",
                "AUTHGENT_SECRET_KEY": secrets.token_hex(32),
                "NO_COLOR": "1",
            },
        )
        self.metadata: dict[str, Any] = {}

    def start(self) -> "Idp":
        if not IDP_BIN.exists():
            raise PeerError(f"{IDP_BIN} is missing: run scripts/e2e-setup.sh")
        # A fresh database: an old one holds signing keys sealed with another secret key.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.proc.start()
        meta_url = f"{self.url}/.well-known/oauth-authorization-server"
        self.proc.wait_until("its metadata", _status_is(meta_url, (200,)), timeout=60)
        with http() as c:
            self.metadata = c.get(meta_url).json()
        if self.metadata.get("issuer") != self.url:
            raise PeerError(f"unexpected issuer {self.metadata.get('issuer')!r}, wanted {self.url!r}")
        return self

    def stop(self) -> None:
        self.proc.stop()

    @property
    def token_endpoint(self) -> str:
        return self.metadata["token_endpoint"]

    def register(self, name: str, grant_types: list[str], scope: str, auth_method: str) -> Client:
        """Open dynamic client registration (RFC 7591)."""
        body = {
            "client_name": name,
            "grant_types": grant_types,
            "scope": scope,
            "token_endpoint_auth_method": auth_method,
        }
        with http() as c:
            r = c.post(self.metadata["registration_endpoint"], json=body)
        if r.status_code not in (200, 201):
            raise PeerError(f"registration of {name} failed: {r.status_code} {r.text}")
        j = r.json()
        return Client(client_id=j["client_id"], client_secret=j["client_secret"], name=name, scope=scope)

    def client_token(self, client: Client, resource: str, scope: str | None = None) -> str:
        """client_credentials grant (client_secret_basic) for `resource` (RFC 8707)."""
        data = {"grant_type": "client_credentials", "resource": resource}
        if scope:
            data["scope"] = scope
        with http() as c:
            r = c.post(self.token_endpoint, data=data, auth=(client.client_id, client.client_secret))
        if r.status_code != 200:
            raise PeerError(f"client_credentials for {client.name} failed: {r.status_code} {r.text}")
        return r.json()["access_token"]

    def exchange(self, actor: Client, subject_token: str, scope: str, resource: str | None = None,
                 audience: str | None = None) -> dict[str, Any]:
        """An RFC 8693 token exchange by hand (client_secret_basic), as the proxy does it."""
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "scope": scope,
        }
        if resource:
            data["resource"] = resource
        if audience:
            data["audience"] = audience
        with http() as c:
            r = c.post(self.token_endpoint, data=data, auth=(actor.client_id, actor.client_secret))
        if r.status_code != 200:
            raise PeerError(f"token exchange failed: {r.status_code} {r.text}")
        return r.json()

    def audit(self, action: str, client_id: str | None = None, max_items: int = 2000) -> list[dict[str, Any]]:
        """authgent's audit log, read through its own `GET /audit` API (newest first)."""
        items: list[dict[str, Any]] = []
        offset = 0
        with http() as c:
            while offset < max_items:
                params: dict[str, Any] = {"action": action, "limit": 200, "offset": offset}
                if client_id:
                    params["client_id"] = client_id
                r = c.get(f"{self.url}/audit", params=params)
                r.raise_for_status()
                page = r.json()
                items.extend(page["items"])
                offset += len(page["items"])
                if not page["items"] or offset >= page["total"]:
                    break
        return items

    def exchanges_of(self, actor: Client, subject_token: str) -> list[dict[str, Any]]:
        """Exchanges authgent recorded for this actor with this subject token (by its `jti`)."""
        parent_jti = jwt_claims(subject_token)["jti"]
        return [
            e for e in self.audit("token.exchanged", client_id=actor.client_id)
            if (e.get("metadata") or {}).get("parent_jti") == parent_jti
        ]


# --------------------------------------------------------------------------------------------
# Backends


class BackendA:
    """e2e/backend_a.py: FastMCP server verifying JWTs against the IdP's JWKS."""

    def __init__(self, workdir: Path, idp: Idp, name: str = "backend-a",
                 accept_audiences: list[str] | None = None, more_idps: list[Idp] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.mcp_url = f"{self.url}/mcp"
        self.accept_audiences = accept_audiences or [self.mcp_url]
        argv = [str(BACKEND_PY), str(E2E_DIR / "backend_a.py"), "--host", LOOPBACK,
                "--port", str(self.port)]
        for issuer in [idp, *(more_idps or [])]:
            argv += ["--issuer", issuer.url]
        for aud in accept_audiences or []:
            argv += ["--accept-audience", aud]
        self.proc = Proc(name=name, argv=argv, log_path=workdir / f"{name}.log", cwd=workdir / name,
                         env={"PYTHONUNBUFFERED": "1"})

    def start(self) -> "BackendA":
        self.proc.start()
        # Up when /mcp answers at all (401 without a token).
        self.proc.wait_until("/mcp", _status_is(self.mcp_url, (401,)), timeout=30)
        return self

    def stop(self) -> None:
        self.proc.stop()


class Nextcloud:
    """nextcloud-mcp-server in bearer-protected (login_flow) mode, without a Nextcloud."""

    def __init__(self, workdir: Path, idp: Idp, oidc_client: Client) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.mcp_url = f"{self.url}/mcp"
        self.client = oidc_client
        d = workdir / "nextcloud"
        self.proc = Proc(
            name="nextcloud-mcp-server",
            argv=[str(NEXTCLOUD_BIN), "run", "--host", LOOPBACK, "--port", str(self.port)],
            log_path=workdir / "nextcloud.log",
            cwd=d,
            env={
                "MCP_DEPLOYMENT_MODE": "login_flow",
                # Nothing listens there: tools that would call Nextcloud fail, listing works.
                "NEXTCLOUD_HOST": f"http://{LOOPBACK}:{free_port()}",
                "OIDC_DISCOVERY_URL": f"{idp.url}/.well-known/openid-configuration",
                "NEXTCLOUD_OIDC_CLIENT_ID": oidc_client.client_id,
                "NEXTCLOUD_OIDC_CLIENT_SECRET": oidc_client.client_secret,
                "NEXTCLOUD_MCP_SERVER_URL": self.url,
                "METRICS_ENABLED": "false",
                "TOKEN_STORAGE_DB": str(d / "tokens.db"),
                "PYTHONUNBUFFERED": "1",
                "HOME": str(d),
            },
        )

    def start(self) -> "Nextcloud":
        if not NEXTCLOUD_BIN.exists():
            raise PeerError(f"{NEXTCLOUD_BIN} is missing: run scripts/e2e-setup.sh")
        self.proc.start()
        self.proc.wait_until("/mcp", _status_is(self.mcp_url, (401,)), timeout=90, interval=0.25)
        return self

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------------------------
# The proxy under test


class Proxy:
    """token-exchange-proxy with a YAML config written here; ready when /readyz is 200."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any], port: int | None = None,
                 secret: str | None = None) -> None:
        self.binary = proxy_binary()
        self.port = port or free_port()
        self.admin_port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.mcp_url = f"{self.url}/mcp"
        self.admin_url = f"http://{LOOPBACK}:{self.admin_port}"
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = {
            "listen": f"{LOOPBACK}:{self.port}",
            "admin_listen": f"{LOOPBACK}:{self.admin_port}",
            "public_url": self.url,
        }
        cfg.update(config)
        if secret is not None:
            secret_file = d / "client-secret"
            secret_file.write_text(secret)
            secret_file.chmod(0o600)
            cfg.setdefault("exchange", {}).setdefault("client_auth", {})["secret_file"] = str(secret_file)
        cfg.setdefault("shutdown", {"drain_delay": "0s", "timeout": "2s"})
        self.config = cfg
        self.config_path = d / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.proc = Proc(
            name=f"proxy {name}",
            argv=[str(self.binary), "--config", str(self.config_path)],
            log_path=workdir / f"proxy-{name}.log",
            cwd=d,
        )

    def start(self) -> "Proxy":
        if not self.binary.exists():
            raise PeerError(f"proxy binary {self.binary} not found (build it: cargo build; or set TXP_BIN)")
        self.proc.start()
        self.proc.wait_until("/readyz = 200", _status_is(f"{self.admin_url}/readyz", (200,)), timeout=30)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()

    def metrics_text(self) -> str:
        with http() as c:
            r = c.get(f"{self.admin_url}/metrics")
        r.raise_for_status()
        return r.text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if there is none)."""
        return metric_value(self.metrics_text(), name, **labels)


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            label_text, value_text = rest.rsplit("}", 1)
            labels = {}
            for part in _split_labels(label_text):
                k, v = part.split("=", 1)
                labels[k.strip()] = v.strip().strip('"')
        else:
            name, value_text = line.split(None, 1)
            labels = {}
        value = value_text.split()[0]
        samples.append((name.strip(), labels, float(value)))
    return samples


def _split_labels(text: str) -> list[str]:
    parts, cur, quoted, escaped = [], "", False, False
    for ch in text:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            cur += ch
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == "," and not quoted:
            if cur.strip():
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for n, ls, v in parse_prometheus(text):
        if n == name and all(ls.get(k) == val for k, val in labels.items()):
            total += v
    return total


# --------------------------------------------------------------------------------------------
# MCP clients (each runs as a subprocess and prints one JSON document)


def _run_client(argv: list[str], timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"client timed out after {timeout}s: {argv[:2]}\nstderr: {exc.stderr}") from exc
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise PeerError(f"client printed no JSON (exit {cp.returncode})\nstdout: {cp.stdout}\nstderr: {cp.stderr}")
    out = json.loads(lines[-1])
    out["_exit"] = cp.returncode
    out["_stderr"] = cp.stderr[-4000:]
    return out


def _client_args(token: str | None, client: Client | None, whoami_calls: int, progress_steps: int,
                 progress_interval_ms: int) -> list[str]:
    args = ["--whoami-calls", str(whoami_calls), "--progress-steps", str(progress_steps),
            "--progress-interval-ms", str(progress_interval_ms)]
    if token:
        args += ["--token", token]
    elif client:
        args += ["--client-id", client.client_id, "--client-secret", client.client_secret]
    return args


def run_py_client(url: str, token: str | None = None, client: Client | None = None, whoami_calls: int = 1,
                  progress_steps: int = 0, progress_interval_ms: int = 300, timeout: float = 60,
                  issuer: str | None = None) -> dict[str, Any]:
    argv = [str(BACKEND_PY), str(PY_CLIENT), "--url", url]
    argv += _client_args(token, client, whoami_calls, progress_steps, progress_interval_ms)
    if client and not token:
        argv += ["--auth-method", "client_secret_basic"]
        if issuer:
            argv += ["--issuer", issuer]
    return _run_client(argv, timeout)


def run_ts_client(url: str, token: str | None = None, client: Client | None = None, whoami_calls: int = 1,
                  progress_steps: int = 0, progress_interval_ms: int = 300, timeout: float = 60,
                  issuer: str | None = None) -> dict[str, Any]:
    argv = ["node", str(TS_CLIENT), "--url", url]
    argv += _client_args(token, client, whoami_calls, progress_steps, progress_interval_ms)
    if issuer and client and not token:
        argv += ["--issuer", issuer]
    return _run_client(argv, timeout, cwd=TS_CLIENT.parent)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
