# triaged in a container: the package and the bundled model, run as a non-root
# user, listening on 0.0.0.0:10025. Mount your own config over
# /etc/triaged/triaged.toml (see config/triaged.toml for every option) and a
# volume on /var/lib/triaged (Maildir, event spool) if you use them.
#
#   docker build -t triaged .
#   docker run --rm -p 127.0.0.1:10025:10025 triaged
#   docker run --rm -v $PWD/my.toml:/etc/triaged/triaged.toml:ro triaged
#   podman build -t triaged . && podman run --rm -p 10025:10025 -p 9100:9100 triaged
# (built and run with podman 4.3 / buildah 1.28 from Debian 12, too).
# /healthz and /readyz are on port 9100 beside /metrics.
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

# The container's own config (a plain file, not a heredoc: builders without
# BuildKit, such as buildah/podman before 1.33, do not read heredocs).
COPY config/container.toml /etc/triaged/triaged.toml

USER triaged
VOLUME ["/var/lib/triaged"]
EXPOSE 10025 9100
# Healthy means the event loop turns over (/healthz on the metrics listener;
# a balancer checks /readyz instead, which also wants the model and next hop).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]
# SIGTERM drains open transactions (server.drain_timeout_s) before exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["triaged"]
CMD ["serve", "--config", "/etc/triaged/triaged.toml"]
