# syntax=docker/dockerfile:1
# idemsink's container image: built in a full Rust image, run from a slim Debian one as a
# non-root user. Pipelines are not baked in: mount them at /etc/idemsink/connectors (the Helm
# chart mounts a ConfigMap there).
#
#   docker build -t idemsink .
#   docker run -v "$PWD/connectors:/etc/idemsink/connectors:ro" -p 9464:9464 idemsink

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# librdkafka is built from source by rdkafka-sys; it needs these besides the compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a change to idemsink's own code reuses their layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches examples \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > src/bin/txn_producer.rs \
 && echo 'fn main() {}' > benches/pipeline.rs && echo 'fn main() {}' > examples/demo.rs \
 && cargo build --release --locked --bin idemsink \
 && rm -rf src benches examples
COPY src src
COPY migrations migrations
COPY benches benches
COPY examples examples
# The stand-in sources above are older than the real ones, but touch makes sure.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin idemsink \
 && strip target/release/idemsink

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 idemsink \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin idemsink \
 && mkdir -p /etc/idemsink/connectors
COPY --from=build /src/target/release/idemsink /usr/local/bin/idemsink
USER 10001:10001
WORKDIR /etc/idemsink
ENV IDEMSINK_CONFIG=/etc/idemsink/connectors \
    IDEMSINK_HTTP_ADDR=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/idemsink"]
CMD ["run"]
