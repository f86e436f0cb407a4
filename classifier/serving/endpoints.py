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

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError("expected unix:/path or host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("expected [v6address]:port")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("IPv6 addresses need brackets: [::1]:port")
    return Endpoint(host=host, port=int(port))


class Allowlist:
    """CIDR blocks a TCP client must be in (the same reading as the proxy's
    server.allowed_clients: IPv4-mapped IPv6 matches the IPv4 blocks)."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.nets: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.nets)


__all__ = ["Allowlist", "Endpoint", "parse_endpoint"]
