# pecd, the PEC provider, as a container image. Built from this source tree:
#
#   docker build -t pecd .                     # the pecd image (target "pecd", the default)
#   docker build --target clamd -t pecd-clamd . # Debian's clamd, configured for pecd
#
# docker-compose.yml builds both and runs the whole topology (PostgreSQL, clamd, two pecd nodes,
# Dovecot); docs/operations.md "Running it: one machine, several nodes, containers" explains it.
#
# The pecd user has a fixed uid/gid (10025) so that every container sharing the Maildir volume
# (the nodes, Dovecot's mail processes: deploy/dovecot/Dockerfile) agrees on who owns the files,
# which pecd writes 0600.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG PECD_UID=10025

# --- build: compile what has no wheel (python-ldap) and install pecd into a venv -------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libldap2-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/pecd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/pecd/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/pecd/bin/pip install --no-cache-dir /src

# --- clamd: Debian's ClamAV daemon, TCP 3310, limits sized for pecd's max_message_size ----------
# freshclam DOWNLOADS the virus signatures (~300 MB from database.clamav.net) when the container
# first starts, and then checks for updates every 2 hours: this service needs Internet access.
# (pecd's own tests never download anything: they run a clamd on signatures pecd generates.)
FROM debian:bookworm-slim AS clamd
RUN apt-get update \
 && apt-get install -y --no-install-recommends clamav-daemon clamav-freshclam ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/clamav /var/lib/clamav \
 && chown clamav:clamav /run/clamav /var/lib/clamav
COPY deploy/clamd/clamd.conf /etc/clamav/clamd.conf
COPY deploy/clamd/freshclam.conf /etc/clamav/freshclam.conf
COPY deploy/clamd/entrypoint.sh /usr/local/bin/clamd-entrypoint
RUN chmod 755 /usr/local/bin/clamd-entrypoint
VOLUME ["/var/lib/clamav"]
EXPOSE 3310
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/3310 && printf 'zPING\\0' >&3 && read -r -d '' r <&3; [ \"$r\" = PONG ]"]
ENTRYPOINT ["/usr/local/bin/clamd-entrypoint"]

# --- pecd: the runtime image (the default target) -----------------------------------------------
FROM ${PYTHON_IMAGE} AS pecd
ARG PECD_UID
# openssl: the independent verifier the evidence bundles' instructions name (`openssl cms
# -verify`) and the operator's tool for the certificates (pecd itself signs in-process);
# libldap/libsasl: python-ldap's runtime libraries (the LDAP provider index).
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssl ca-certificates libldap-2.5-0 libsasl2-2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid "${PECD_UID}" pecd \
 && useradd --system --uid "${PECD_UID}" --gid pecd --home-dir /var/lib/pecd --shell /usr/sbin/nologin pecd \
 && mkdir -p /etc/pecd /var/lib/pecd/data /var/lib/pecd/mail /var/lib/pecd/dovecot \
 && chown -R pecd:pecd /var/lib/pecd
COPY --from=build /opt/pecd /opt/pecd
COPY deploy/healthcheck.py /usr/local/bin/pecd-healthcheck
ENV PATH=/opt/pecd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PECD_CONFIG=/etc/pecd/pecd.toml
USER pecd
WORKDIR /var/lib/pecd
# The listeners of deploy/pecd.toml (reception 25, SMTPS 465, submission 587, HTTPS 443) and the
# metrics port. Ports below 1024 as a non-root user: Docker (20.10 and later) sets
# net.ipv4.ip_unprivileged_port_start=0 in a container's network namespace; docker-compose.yml
# sets it explicitly too.
EXPOSE 25 465 587 443 9108
# GET /healthz on [metrics] listen (src/pecd/runtime/metrics.py); when [metrics] is off the
# check only says the config file is readable (there is no port to ask).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/pecd/bin/python", "/usr/local/bin/pecd-healthcheck"]
# SIGTERM drains (queue.drain_seconds, 20 s by default): give it time before SIGKILL
# (docker stop -t, compose stop_grace_period). SIGHUP reloads the provider index.
STOPSIGNAL SIGTERM
CMD ["pecd", "serve", "-c", "/etc/pecd/pecd.toml"]
