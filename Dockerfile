# walvault in a container: multi-stage, the runtime image runs as an unprivileged user.
#   docker build -t walvault/walvault-agent:latest .
# The Kubernetes manifest (deploy/kubernetes/walvault-agent.yaml) uses this image name.
# Not built in CI here: the development machines have no Docker engine.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p walvault-agent -p walvault-recover \
 && install -m 755 target/release/walvault-agent target/release/walvault-recover /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 walvault \
 && useradd --system --uid 10001 --gid walvault --home-dir /var/lib/walvault --create-home --shell /usr/sbin/nologin walvault
COPY --from=build /usr/local/bin/walvault-agent /usr/local/bin/walvault-recover /usr/local/bin/
USER 10001:10001
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/walvault-agent"]
CMD ["run", "--config", "/etc/walvault/walvault.toml"]
