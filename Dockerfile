# syntax=docker/dockerfile:1
# The tenant-audit image: a release build on Debian 12, run as the non-root user of a distroless
# runtime (uid 65532, as the Helm chart expects).
#   docker build -t ghcr.io/tenant-audit/tenant-audit:0.1.0 .
#   docker run -e TENANT_AUDIT_DATABASE_URL=postgres://... -v $PWD/tenant-audit.toml:/etc/tenant-audit/config.toml:ro -p 9841:9841 ghcr.io/tenant-audit/tenant-audit:0.1.0

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/tenant-audit /usr/local/bin/tenant-audit

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/tenant-audit /usr/local/bin/tenant-audit
USER 65532:65532
EXPOSE 9841
ENTRYPOINT ["/usr/local/bin/tenant-audit"]
CMD ["serve", "--config", "/etc/tenant-audit/config.toml"]
