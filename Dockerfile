# token-exchange-proxy container image.
#
#   docker build -t token-exchange-proxy:dev .
#
# The builder runs exactly `cargo build --release --locked` (the same command as a local release
# build), so the image contains the binary that the lock file describes. The runtime image is
# distroless: glibc and libgcc only, no shell, no package manager, non-root user 65532.

FROM rust:1.95.0-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && install -D -m 0755 target/release/token-exchange-proxy /out/token-exchange-proxy

# Same Debian release as the builder (bookworm = Debian 12), so the glibc the binary was
# linked against is the one it runs on.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="token-exchange-proxy" \
      org.opencontainers.image.description="Validates OAuth bearer tokens, exchanges them (RFC 8693) and forwards to the backend" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/token-exchange-proxy /usr/local/bin/token-exchange-proxy
USER 65532:65532
# 8080: proxy listener; 9090: admin listener (/healthz, /readyz, /metrics).
EXPOSE 8080 9090
# No HEALTHCHECK: there is no shell or client in the image; Kubernetes probes /healthz and
# /readyz on the admin port.
ENTRYPOINT ["/usr/local/bin/token-exchange-proxy"]
