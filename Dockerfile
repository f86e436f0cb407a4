# syntax=docker/dockerfile:1.7
# triaged in a container: the package and the bundled model, run as a non-root
# user, listening on 0.0.0.0:10025. Mount your own config over
# /etc/triaged/triaged.toml (see config/triaged.toml for every option) and a
# volume on /var/lib/triaged (Maildir, event spool) if you use them.
#
#   docker build -t triaged .
#   docker run --rm -p 127.0.0.1:10025:10025 triaged
#   docker run --rm -v $PWD/my.toml:/etc/triaged/triaged.toml:ro triaged
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/triaged
# Only what the runtime package needs: a change to tests or docs does not
# invalidate the dependency layer.
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY classifier/ classifier/
COPY models/default.onnx models/
RUN pip install . \
 && useradd --system --uid 10025 --home-dir /var/lib/triaged --shell /usr/sbin/nologin triaged \
 && install -d -o triaged -g triaged -m 0750 /var/lib/triaged

# The container's own defaults: reachable from other containers and the host
# (Docker networks are private ranges), absolute paths, JSON logs for the
# collector. Everything else is at the built-in default.
COPY <<'EOF' /etc/triaged/triaged.toml
[server]
allowed_clients = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
xforward_clients = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]

[[server.listeners]]
address = "0.0.0.0:10025"

[upstream]
# Set your MTA's reinjection listener here, e.g. "smtp://postfix:10026".
url = "maildir:/var/lib/triaged/maildir"

[classifier]
model_path = "/opt/triaged/models/default.onnx"

[events]
spool_dir = "/var/lib/triaged/spool/events"
jsonl_path = "/var/lib/triaged/events/events.jsonl"

[logging]
format = "json"
EOF

USER triaged
VOLUME ["/var/lib/triaged"]
EXPOSE 10025
# Ready means greeting with 220 (what Postfix needs from a filter).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD ["python", "-c", "import smtplib; smtplib.SMTP('127.0.0.1', 10025, timeout=4).quit()"]
# SIGTERM drains open transactions (server.drain_timeout_s) before exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["triaged"]
CMD ["serve", "--config", "/etc/triaged/triaged.toml"]
