"""Where the inference service listens and who may talk to it.

"unix:/run/triaged/inference.sock": a Unix socket, for the workers of one
host. The file's mode (classifier.service.socket_mode, 0600 by default: only
triaged's own user) is the access control, so no address allowlist is needed;
it costs no TCP/IP stack per frame and cannot be reached from the network.

"host:port" / "[v6]:port": TCP, for the micro-service split (front-end hosts
without a GPU share one GPU host). Anyone who can route to the port could ask
for verdicts or load the service, so clients outside
classifier.service.allowed_clients are refused at accept.
"""

from __future__ import annotations

from dataclasses import dataclass

from classifier.addresses import split_host_port


@dataclass(frozen=True)
class Endpoint:
    path: str = ""  # a Unix socket; else host and port
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """"unix:/abs/path", "host:port" or "[v6]:port"; ValueError says what is wrong."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError("unix: needs an absolute socket path")
        # sun_path is 108 bytes on Linux, NUL included.
        if len(path.encode()) > 107:
            raise ValueError("unix socket path longer than 107 bytes")
        return Endpoint(path=path)
    try:
        host, port = split_host_port(text)
    except ValueError as exc:
        if str(exc) == "expected host:port":
            raise ValueError("expected unix:/path or host:port") from None
        raise
    return Endpoint(host=host, port=port)



__all__ = ["Endpoint", "parse_endpoint"]
