# Prometheus for the compose stack on the private test engine (deploy/local-engine.sh): no image
# registry is reachable there, so instead of prom/prometheus this is the local Debian base plus
# Debian's prometheus package (2.42 on bookworm; compose pins 3.5.0, see deploy/VERIFIED.md).
# The compose file mounts the scrape config at /etc/prometheus/prometheus.yml, as for the real image.
ARG BASE
# hadolint ignore=DL3006
FROM ${BASE}
# Versions come from the base's Debian release; wget is for compose's healthcheck, as in prom/prometheus.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
# The package's system user (its uid is chosen at install time, hence a name).
# hadolint ignore=DL3066
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
# The same paths and defaults as prom/prometheus's image.
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
