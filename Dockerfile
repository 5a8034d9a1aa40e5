# syntax=docker/dockerfile:1
# One image with every binary of the pipeline; compose/docker-compose.yml runs each service from it
# with its own command. Needs BuildKit (the default of Docker 23+ and of `docker compose`).
#
#   docker build -t cdc-pipeline .
#   docker run --rm cdc-pipeline cdc-reader --help

# --- build: release binaries -----------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target/ are BuildKit cache mounts: they outlive this layer, so a source change
# recompiles only the crates it touches (the dependencies stay compiled), not the whole tree.
ARG BINARIES="user-api post-api cdc-reader projector migrate kafka-print"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    set -eu; \
    cargo build --release --locked -p api -p cdc-reader -p projector -p schema -p kafka-tools --bins; \
    mkdir /out; \
    for bin in $BINARIES; do cp "target/release/$bin" /out/; done

# --- runtime: the binaries, glibc and zlib (librdkafka is linked in), curl for healthchecks ---
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cdc
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV RUST_LOG=info
# Each service picks its binary (compose sets `command`); without one, say what there is.
CMD ["sh", "-c", "echo 'run one of: user-api post-api cdc-reader projector migrate kafka-print' >&2; exit 64"]
