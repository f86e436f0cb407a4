"""The metrics listener (`metrics.listen`): /metrics, /healthz, /readyz.

A small threaded http.server rather than prometheus_client's
start_http_server, which serves only /metrics. It runs in threads of its own
and reads only through the two providers it is given (a Prometheus registry's
exposition, a health snapshot that is cached elsewhere), so a blocked event
loop cannot stall it: that is exactly when /healthz must answer 503.

A supervisor of several worker processes serves the same handler with its
own providers (aggregated metrics, the workers' combined health).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.health import HealthSnapshot

# Accept header -> (body, content type)
MetricsProvider = Callable[[str], tuple[bytes, str]]
HealthProvider = Callable[[], HealthSnapshot]


def registry_metrics(registry: CollectorRegistry) -> MetricsProvider:
    """Exposition of one registry, in the format the scraper asks for."""

    def provide(accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    return provide


def make_handler(metrics: MetricsProvider, health: HealthProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
        server_version = "triaged"
        sys_version = ""

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    data, ctype = metrics(self.headers.get("Accept", ""))
                    status = 200
                elif path in ("/healthz", "/readyz"):
                    snap = health()
                    ok = snap.alive if path == "/healthz" else snap.ready
                    status = 200 if ok else 503
                    data, ctype = msgspec.json.encode(snap) + b"\n", "application/json"
                else:
                    status, data, ctype = 404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain"
            except Exception as exc:  # a provider bug: an answer, not a dropped connection
                status, data, ctype = 500, f"{type(exc).__name__}\n".encode(), "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # a scrape or health check every second is not worth a line

    return Handler


class StatusServer:
    """The listener in a daemon thread; `port` is the bound port."""

    def __init__(self, host: str, port: int, metrics: MetricsProvider, health: HealthProvider) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        self._httpd = Server((host, port), make_handler(metrics, health))
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="triaged-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
