"""3. Progress notifications of a streaming tool reach the client one by one through the proxy."""

from __future__ import annotations

import pytest

import harness
from checks import accepted, client_ok, progress_streamed

STEPS = 5
INTERVAL_MS = 300


@pytest.fixture(scope="module")
def client_token(idp, mcp_client, shared_proxy) -> str:
    return idp.client_token(mcp_client, resource=shared_proxy.mcp_url)


@pytest.mark.parametrize("run", [harness.run_py_client, harness.run_ts_client], ids=["python-sdk", "typescript-sdk"])
def test_progress_notifications_are_not_buffered(run, shared_proxy, client_token):
    accepted(shared_proxy.mcp_url, client_token)
    out = client_ok(run(shared_proxy.mcp_url, token=client_token, whoami_calls=0,
                        progress_steps=STEPS, progress_interval_ms=INTERVAL_MS))
    progress_streamed(out, steps=STEPS, interval_ms=INTERVAL_MS)
