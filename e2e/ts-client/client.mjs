// MCP client built on the official TypeScript SDK, used by the end-to-end suite.
//
// Talks streamable HTTP to one URL (the proxy, or a backend directly) and prints one JSON
// document on stdout, in the same shape as ../client_py.py:
//   {"ok": true, "client": "typescript-sdk", "server": {...}, "tools": [...], "whoami": {...},
//    "whoami_calls": N, "progress": {"notifications": [...], "result": {...}, ...}}
//
// Token sources:
//   --token TOKEN                      a bearer token obtained by the caller
//   --client-id ID --client-secret S   the SDK discovers the authorization server from the
//   [--issuer URL]                     server's 401 and protected resource metadata, then
//                                      obtains a client_credentials token (client_secret_basic)
//
// Arrival times of progress notifications are Date.now()/1000, comparable with the
// emission times the backend reports (same host, same clock).

import { parseArgs } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { ClientCredentialsProvider } from '@modelcontextprotocol/sdk/client/auth-extensions.js';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    token: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    issuer: { type: 'string' },
    scope: { type: 'string' },
    'whoami-calls': { type: 'string', default: '1' },
    'progress-steps': { type: 'string', default: '0' },
    'progress-interval-ms': { type: 'string', default: '300' },
    timeout: { type: 'string', default: '30' },
  },
});

function structured(result) {
  if (result.structuredContent) {
    const v = result.structuredContent;
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === 'result') return v.result;
    return v;
  }
  const text = (result.content || []).filter((c) => c.type === 'text').map((c) => c.text).join('');
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

// authgent-server answers a client_credentials grant with `"refresh_token": null` (and
// `"issued_token_type": null`); the SDK's token response schema wants such members absent, not
// null. This fetch drops null members from token endpoint responses (recognised by a form body
// carrying grant_type) and passes everything else through untouched.
async function fetchDroppingNullTokenFields(input, init) {
  const res = await fetch(input, init);
  const body = init && init.body;
  const isTokenRequest = body instanceof URLSearchParams && body.has('grant_type');
  const type = res.headers.get('content-type') || '';
  if (!isTokenRequest || !res.ok || !type.includes('application/json')) return res;
  const json = await res.json();
  for (const key of Object.keys(json)) if (json[key] === null) delete json[key];
  return new Response(JSON.stringify(json), { status: res.status, statusText: res.statusText, headers: res.headers });
}

async function run() {
  if (!args.url) throw new Error('--url is required');
  const timeoutMs = Number(args.timeout) * 1000;
  const out = { ok: false, client: 'typescript-sdk' };
  const options = {};
  let provider;
  if (args.token) {
    options.requestInit = { headers: { Authorization: `Bearer ${args.token}` } };
  } else if (args['client-id']) {
    const opts = { clientId: args['client-id'], clientSecret: args['client-secret'], clientName: 'e2e-ts-client' };
    if (args.scope) opts.scope = args.scope;
    if (args.issuer) opts.expectedIssuer = args.issuer;
    provider = new ClientCredentialsProvider(opts);
    options.authProvider = provider;
    options.fetch = fetchDroppingNullTokenFields;
  }
  const transport = new StreamableHTTPClientTransport(new URL(args.url), options);
  const client = new Client({ name: 'e2e-ts-client', version: '0.0.0' });
  await client.connect(transport, { timeout: timeoutMs });
  try {
    const info = client.getServerVersion();
    out.server = { name: info?.name, version: info?.version, protocol_version: transport.protocolVersion };
    const tools = await client.listTools(undefined, { timeout: timeoutMs });
    out.tools = tools.tools.map((t) => t.name).sort();
    const whoamiCalls = Number(args['whoami-calls']);
    if (whoamiCalls > 0) {
      const results = [];
      for (let i = 0; i < whoamiCalls; i++) {
        const res = await client.callTool({ name: 'whoami', arguments: {} }, undefined, { timeout: timeoutMs });
        if (res.isError) throw new Error(`whoami failed: ${JSON.stringify(res.content)}`);
        results.push(structured(res));
      }
      out.whoami = results[0];
      out.whoami_calls = results.length;
      out.whoami_jtis = [...new Set(results.map((r) => r && r.jti))].sort();
    }
    const steps = Number(args['progress-steps']);
    if (steps > 0) {
      const notifications = [];
      const tCall = Date.now() / 1000;
      const res = await client.callTool(
        { name: 'progress', arguments: { steps, interval_ms: Number(args['progress-interval-ms']) } },
        undefined,
        {
          timeout: timeoutMs,
          onprogress: (p) => {
            notifications.push({ t: Date.now() / 1000, progress: p.progress, total: p.total, message: p.message });
          },
        },
      );
      const tResult = Date.now() / 1000;
      if (res.isError) throw new Error(`progress failed: ${JSON.stringify(res.content)}`);
      out.progress = { t_call: tCall, t_result: tResult, notifications, result: structured(res) };
    }
    if (provider && provider.tokens()) out.obtained_token = provider.tokens().access_token;
    out.ok = true;
  } finally {
    try {
      await transport.terminateSession();
    } catch {
      // the session may already be gone; closing below is what matters
    }
    await client.close();
  }
  return out;
}

const deadline = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, client: 'typescript-sdk', error: 'overall timeout' }) + '\n');
  process.exit(1);
}, Number(args.timeout) * 2000);

run()
  .then((out) => {
    clearTimeout(deadline);
    process.stdout.write(JSON.stringify(out) + '\n');
    process.exit(0);
  })
  .catch((err) => {
    clearTimeout(deadline);
    const detail = err && err.stack ? err.stack : String(err);
    process.stdout.write(JSON.stringify({ ok: false, client: 'typescript-sdk', error: String(err), trace: detail }) + '\n');
    process.exit(1);
  });
