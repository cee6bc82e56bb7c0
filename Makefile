# token-exchange-proxy — developer entry points.
#   make demo   the main job end to end: IdP, MCP backend, proxy, MCP client (installs peers on first run)
#   make test   formatting, lints, unit + integration tests, deployment checks, end-to-end suite,
#               and the short reliability runs (soak, drain, IdP chaos, 30 s of fuzzing per target)
#   make bench  side-by-side benchmark (see README "Performance")
#   make soak   soak, drain under load and IdP chaos at full size (see README "Reliability")
#   make fuzz   10 minutes of AFL++ per fuzz target, about 65 minutes (see README "Reliability")

CARGO ?= cargo
TXP_BIN ?= target/debug/token-exchange-proxy

.PHONY: all build build-release fmt-check clippy unit deploy-check e2e test demo bench clean-peers \
	soak soak-short fuzz fuzz-short

all: build

build:
	$(CARGO) build --locked

# The same command the Dockerfile's build stage runs.
build-release:
	$(CARGO) build --release --locked

fmt-check:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit:
	$(CARGO) nextest run --locked --no-fail-fast

deploy-check:
	bash scripts/check-deploy.sh
	bash scripts/check-deploy-selftest.sh

e2e: build
	TXP_BIN=$(TXP_BIN) bash e2e/run.sh

test: fmt-check clippy unit deploy-check e2e soak-short fuzz-short

# README "Reliability": full sizes, release build; the results go to benches/results/.
# Both scripts run even when the first fails; the target fails if either did.
soak:
	status=0; \
	SOAK_RESULTS_DIR=benches/results bash benches/soak.sh || status=1; \
	SOAK_RESULTS_DIR=benches/results bash benches/chaos.sh || status=1; \
	exit $$status

# The same checks, shortened, on the debug build that `unit` and `e2e` already made.
soak-short: build
	status=0; \
	SOAK_PROFILE=short bash benches/soak.sh || status=1; \
	CHAOS_PROFILE=short bash benches/chaos.sh || status=1; \
	exit $$status

fuzz:
	FUZZ_UPDATE_CORPUS=1 FUZZ_SUMMARY=benches/results/fuzz.md bash scripts/fuzz.sh 600

fuzz-short:
	bash scripts/fuzz.sh 30

demo: build
	TXP_BIN=$(TXP_BIN) bash e2e/demo.sh

bench:
	bash benches/run.sh
	bash benches/telemetry.sh

clean-peers:
	rm -rf .peers .tools e2e/ts-client/node_modules
