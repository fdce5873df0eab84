# relaygate in a container: the wheel in a virtual environment, run by an
# unprivileged user, its data in the /data volume.
#   docker build -t relaygate .          docker compose up -d   (compose.yaml)
#   contrib/docker/smoke.sh              builds, starts, sends a message, tears down
# README.md "Run it in a container" says more.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/relaygate/bin:$PATH \
    RELAYGATE_CONFIG=/etc/relaygate/relaygate.toml
COPY --from=build /wheels /tmp/wheels
# A fixed uid/gid (10001) so volumes and Kubernetes' runAsNonRoot can rely on it.
RUN python -m venv /opt/relaygate \
 && /opt/relaygate/bin/pip install --no-cache-dir /tmp/wheels/relaygate-*.whl \
 && rm -rf /tmp/wheels \
 && groupadd --system --gid 10001 relaygate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin relaygate \
 && install -d -m 0700 -o 10001 -g 10001 /data
COPY contrib/docker/relaygate.toml /etc/relaygate/relaygate.toml

# TLS certificates, DKIM keys, metrics files, and the SQLite database when
# [storage] url is not set. A new named volume takes /data's owner and mode.
VOLUME ["/data"]
# 587 submission (STARTTLS), 465 submissions (implicit TLS), 8025 web UI and API.
EXPOSE 587 465 8025
USER 10001:10001
WORKDIR /data
# `relaygate health`: listeners answer and storage is reachable (exit 0), else 1.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["relaygate", "health", "--config", "/etc/relaygate/relaygate.toml"]
# SIGTERM (docker stop) drains connections for [limits] shutdown_grace seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relaygate"]
CMD ["serve", "--config", "/etc/relaygate/relaygate.toml"]
