#!/usr/bin/env bash
# Proves that scripts/check-deploy.sh can fail: a check that cannot fail checks nothing.
#
# Copies k8s/ and the Dockerfile to a scratch directory, checks that the unmodified copy passes,
# then applies one deliberate mistake at a time and asserts that the named check group fails
# with the expected message. The repository itself is never modified.
#
#   scripts/check-deploy-selftest.sh
#
# Takes about a minute once the tools are installed (check-deploy.sh installs them on first use).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECK=$ROOT/scripts/check-deploy.sh
TOOLS_PY=${DEPLOY_TOOLS_DIR:-$ROOT/.tools}/venv/bin/python   # installed by the first run below
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy-selftest.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

PASSED=0
FAILED=0

fresh_copy() {
  rm -rf "$SCRATCH/copy"
  mkdir -p "$SCRATCH/copy"
  cp -R "$ROOT/k8s" "$SCRATCH/copy/k8s"
  cp "$ROOT/Dockerfile" "$SCRATCH/copy/Dockerfile"
}

run_copy() {
  DEPLOY_K8S_DIR=$SCRATCH/copy/k8s DEPLOY_DOCKERFILE=$SCRATCH/copy/Dockerfile "$CHECK" "$@"
}

# mutate FILE OCCURRENCE OLD NEW: replaces the OCCURRENCE-th (1-based) OLD in FILE by NEW, and
# fails if OLD is not there or if the replacement changes no YAML data (it hit a comment), so
# that a mistake never silently stops applying.
mutate() {
  MUT_FILE=$SCRATCH/copy/$1 MUT_NTH=$2 MUT_OLD=$3 MUT_NEW=$4 "$TOOLS_PY" - <<'PY'
import os, sys
import yaml
path, nth = os.environ["MUT_FILE"], int(os.environ["MUT_NTH"])
old, new = os.environ["MUT_OLD"], os.environ["MUT_NEW"]
text = open(path).read()
at = -1
for _ in range(nth):
    at = text.find(old, at + 1)
    if at < 0:
        sys.exit(f"selftest: occurrence {nth} of {old!r} not found in {path}")
mutated = text[:at] + new + text[at + len(old):]
if path.endswith(".yaml"):
    try:
        same = list(yaml.safe_load_all(text)) == list(yaml.safe_load_all(mutated))
    except yaml.YAMLError:
        same = False
    if same:
        sys.exit(f"selftest: replacing {old!r} in {path} changes no data (a comment?)")
open(path, "w").write(mutated)
PY
}

# expect_failure DESCRIPTION GROUP EXPECTED-TEXT FILE OCCURRENCE OLD NEW
expect_failure() {
  local what=$1 group=$2 expected=$3 out rc=0
  shift 3
  fresh_copy
  if ! mutate "$@"; then
    FAILED=$((FAILED + 1))
    printf 'FAIL  %-58s the mistake could not be applied\n' "$what"
    return 0
  fi
  out=$(run_copy --only "$group" 2>&1) || rc=$?
  if [[ $rc -ne 0 ]] && grep -qF -- "$expected" <<<"$out"; then
    PASSED=$((PASSED + 1))
    printf 'ok    %-58s caught by %s\n' "$what" "$group"
  else
    FAILED=$((FAILED + 1))
    printf 'FAIL  %-58s not caught by %s (exit %s, wanted "%s")\n' "$what" "$group" "$rc" "$expected"
    while IFS= read -r line; do printf '      | %s\n' "$line"; done <<<"$out"
  fi
}

fresh_copy
if out=$(run_copy 2>&1); then
  PASSED=$((PASSED + 1))
  echo "ok    the unmodified copy passes every check"
else
  echo "$out"
  echo "selftest: the unmodified copy fails; fix that first"
  echo "deploy-selftest: $PASSED passed, 1 failed"
  exit 1
fi

D=k8s/base/deployment.yaml

expect_failure "sidecar runAsNonRoot: false" policy "runAsNonRoot must be true" \
  "$D" 2 "runAsNonRoot: true" "runAsNonRoot: false"
expect_failure "misspelt securityContext key" validate "Additional properties are not allowed" \
  "$D" 1 "readOnlyRootFilesystem: true" "readOnlyRootFilesytem: true"
expect_failure "backend allowPrivilegeEscalation: true" checkov "CKV_K8S_20" \
  "$D" 2 "allowPrivilegeEscalation: false" "allowPrivilegeEscalation: true"
expect_failure "capability added to the sidecar" policy "capabilities.add" \
  "$D" 1 'drop: ["ALL"]' 'drop: ["ALL"]
              add: ["NET_ADMIN"]'
expect_failure "proxy as a plain init container" policy "restartPolicy: Always (native sidecar)" \
  "$D" 1 "restartPolicy: Always  " "restartPolicy: OnFailure  "
expect_failure "grace period shorter than the drain" policy "terminationGracePeriodSeconds 30 must exceed" \
  "$D" 1 "  terminationGracePeriodSeconds: 60" "  terminationGracePeriodSeconds: 30"
expect_failure "readiness probe on the wrong path" policy "readinessProbe must GET /readyz" \
  "$D" 2 "path: /readyz" "path: /healthz"
expect_failure "memory limit removed" policy "resources.limits.memory is not set" \
  "$D" 1 "limits:
              memory: 256Mi" "limits: {}"
expect_failure "unknown key in the proxy config" policy 'unknown field `grace`' \
  k8s/base/config.yaml 1 "  drain_delay: 5s" "  drain_delay: 5s
  grace: 5s"
expect_failure "duration without a unit" policy "config error: shutdown.timeout: not a duration" \
  k8s/overlays/workload-identity/config.yaml 1 "timeout: 25s" "timeout: 25"
expect_failure "every path public (check-config only)" policy "config error: inbound.public_paths" \
  k8s/base/config.yaml 1 "public_paths: []" 'public_paths: ["/"]'
expect_failure "admin port exposed by the Service" policy "must expose only the proxy port" \
  k8s/base/service.yaml 1 "      appProtocol: http" "      appProtocol: http
    - name: admin
      port: 9090
      targetPort: 9090"
expect_failure "misspelt apiVersion (no schema)" validate "Couldn't find schema" \
  k8s/base/pdb.yaml 1 "apiVersion: policy/v1" "apiVersion: policy/v1beta9"
expect_failure "client secret mounted writable" policy "must be readOnly" \
  k8s/overlays/secret/deployment-patch.yaml 1 "readOnly: true" "readOnly: false"
expect_failure "day-long projected token" policy "at most 3600s" \
  k8s/overlays/workload-identity/deployment-patch.yaml 1 "expirationSeconds: 3600" "expirationSeconds: 86400"
expect_failure "TLS Secret mounted with subPath" policy "mounted with subPath" \
  k8s/overlays/tls/deployment-patch.yaml 1 "              mountPath: /var/run/tls" "              mountPath: /var/run/tls/tls.crt
              subPath: tls.crt"
expect_failure "certificate kept in another Secret" policy "is not the Secret the proxy mounts" \
  k8s/overlays/tls/certificate.yaml 1 "secretName: token-exchange-proxy-tls" "secretName: other-tls"
expect_failure "certificate renewed with the same key" policy "rotationPolicy must be Always" \
  k8s/overlays/tls/certificate.yaml 1 "rotationPolicy: Always" "rotationPolicy: Never"
expect_failure "TLS key file outside the mount" policy "tls.key_file /var/run/tls-old/tls.key is not mounted" \
  k8s/overlays/tls/config.yaml 1 "key_file: /var/run/tls/tls.key" "key_file: /var/run/tls-old/tls.key"
expect_failure "patch that no longer matches" render "FAIL  render overlays/secret" \
  k8s/overlays/secret/deployment-patch.yaml 1 "name: nextcloud-mcp" "name: nextcloud-mcp-old"
expect_failure "builder image on :latest" hadolint "DL3007" \
  Dockerfile 1 "FROM rust:1.95.0-bookworm AS builder" "FROM rust:latest AS builder"
expect_failure "YAML 1.1 boolean" yamllint "truthy value should be one of" \
  k8s/base/networkpolicy.yaml 1 'nextcloud-mcp-client: "true"' "nextcloud-mcp-client: yes"

echo "deploy-selftest: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
