# Builds the one `tally` binary. Used by docker-compose.yml for every stage.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tally /usr/local/bin/tally
ENTRYPOINT ["tally"]
