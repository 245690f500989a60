# The one `tally` image: every stage of docker-compose.yml (init, producer, parser, aggregator,
# db-client) runs it with another subcommand. Needs BuildKit (the default builder since Docker
# 23; `DOCKER_BUILDKIT=1` before that) for the cache mounts.
#
#   docker build -t tally:local .          (docker compose builds it as tally:${TALLY_IMAGE_TAG:-local})
#   docker run --rm tally:local --help
#
# Two ways to the same runtime image (user, entrypoint, health check):
#   - the default target compiles the sources in the Rust image (RUST_IMAGE);
#   - the `prebuilt` target packs a binary built on the host, for machines that cannot pull a
#     Rust image. Its context is a folder holding only that binary (the main context leaves
#     target/ out): scripts/images does
#       docker build --target prebuilt -f Dockerfile -t tally:local <folder with `tally`>
#
# Base images are pinned to exact tags (override with --build-arg for an upgrade). Builder and
# runtime are both Debian 12 (bookworm): the binary links the glibc it was built against.
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-20260824-slim

FROM ${RUST_IMAGE} AS build
# The full rust image (buildpack-deps) has gcc, make and perl, which librdkafka's build and the
# vendored OpenSSL need; cmake only in case rdkafka's `cmake-build` feature is switched on.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore keeps target/, .git/, the services' and benchmarks' data and ./data out of the
# context; this copies the sources only.
COPY . .
# Cache mounts: the crate downloads and target/ (librdkafka, OpenSSL and every dependency
# compiled) survive between builds, so a source change rebuilds only the changed crates. The
# binary is copied out of the cached target/ within the same step.
RUN --mount=type=cache,id=tally-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=tally-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=tally-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bin tally \
    && install -D -m 0755 target/release/tally /out/tally

# The runtime, shared by both targets.
FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tally \
    && useradd --system --uid 10001 --gid tally --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tally
# /metrics, /livez, /readyz of the long-running stages (docker-compose.yml sets it too).
ENV TALLY_HTTP_ADDR=0.0.0.0:9100
EXPOSE 9100
# The slim image has no curl: bash's /dev/tcp asks /livez (200 while the stage's loop moves; not
# /readyz, which an idle surplus replica never passes) on TALLY_HTTP_ADDR's port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${TALLY_HTTP_ADDR##*:} && printf 'GET /livez HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
USER 10001:10001
ENTRYPOINT ["tally"]
CMD ["--help"]

# A binary built on the host (scripts/images): the context holds `tally` only.
FROM runtime AS prebuilt
COPY --chmod=0755 tally /usr/local/bin/tally
# Fail the build, not the first start, if a shared library the binary needs is missing here.
RUN ! ldd /usr/local/bin/tally | grep 'not found' && tally --version

# The default: compiled from the sources above.
FROM runtime
COPY --from=build /out/tally /usr/local/bin/tally
RUN ! ldd /usr/local/bin/tally | grep 'not found' && tally --version
