"""Addresses in config: "host:port" and CIDR lists. One parser and one
membership test for both front ends (`server.allowed_clients`,
`xforward_clients`) and the inference service (`classifier.endpoint`,
`classifier.service.allowed_clients`). Here, not in `proxy`, because the
classifier never imports `proxy`."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks:
    """A set of CIDR blocks, built once at start."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.nets: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        # Answers by address string: parsing one costs a few us per
        # connection, and clients (MTAs, a balancer) are few. Bounded.
        self._seen: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        """True for an address inside one block. An IPv6 zone ("%eth0") is
        ignored, and an IPv4-mapped IPv6 address (a dual-stack socket's view
        of an IPv4 client) matches the IPv4 blocks; anything unparsable is
        outside."""
        if not isinstance(address, str):
            return False
        seen = self._seen.get(address)
        if seen is None:
            seen = self._contains(address)
            if len(self._seen) < 4096:
                self._seen[address] = seen
        return seen

    def _contains(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.nets)


def split_host_port(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError("expected host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("expected [v6address]:port")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("IPv6 addresses need brackets: [::1]:port")
    return host, int(port)
