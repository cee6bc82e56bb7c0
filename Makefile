# token-exchange-proxy — developer entry points.
#   make demo   the main job end to end: IdP, MCP backend, proxy, MCP client (installs peers on first run)
#   make test   formatting, lints, unit + integration tests, deployment checks, end-to-end suite
#   make bench  side-by-side benchmark (see README "Performance")

CARGO ?= cargo
TXP_BIN ?= target/debug/token-exchange-proxy

.PHONY: all build build-release fmt-check clippy unit deploy-check e2e test demo bench clean-peers

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

test: fmt-check clippy unit deploy-check e2e

demo: build
	TXP_BIN=$(TXP_BIN) bash e2e/demo.sh

bench:
	bash benches/run.sh
	bash benches/telemetry.sh

clean-peers:
	rm -rf .peers .tools e2e/ts-client/node_modules
