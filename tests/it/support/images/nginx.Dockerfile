# Test workload for tests/it/docker.rs: nginx from Debian's packages on the locally imported
# Debian base (no registry here). Each replica answers GET / with its host name.
ARG BASE_IMAGE=routemesh-test-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
COPY nginx.conf /etc/nginx/nginx.conf
COPY nginx-entrypoint.sh /entrypoint.sh
ENTRYPOINT ["/bin/sh", "/entrypoint.sh"]
