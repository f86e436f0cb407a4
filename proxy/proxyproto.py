"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), sans-IO.

`parse(buf)` either returns the header and how many bytes it used, or the
number of further bytes it needs at least. The caller reads exactly that, so
no byte of the SMTP stream after the header is ever consumed here.
A v2 LOCAL command (HAProxy health checks) parses to `local=True`.
"""

from __future__ import annotations

import ipaddress
import struct

import msgspec

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # including CRLF


class ProxyError(ValueError):
    """Not a valid PROXY header: the connection is closed."""


class ProxyHeader(msgspec.Struct, frozen=True):
    version: int
    local: bool  # v2 LOCAL / v1 UNKNOWN: no addresses, use the real peer
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(buf: bytes) -> tuple[ProxyHeader, int] | int:
    """The header and its length, or how many more bytes are needed (> 0)."""
    if not buf:
        return 5
    if buf[:1] == b"P":
        return _parse_v1(buf)
    if buf[:1] == b"\r":
        return _parse_v2(buf)
    raise ProxyError("no PROXY signature")


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | int:
    if not b"PROXY "[: len(buf)].startswith(buf[:6]):
        raise ProxyError("bad v1 signature")
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= _V1_MAX:
            raise ProxyError("v1 header too long")
        return 1
    parts = buf[:end].decode("ascii", "replace").split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyError("bad v1 header")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(version=1, local=True), end + 2
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError("bad v1 header")
    try:
        src = ipaddress.ip_address(parts[2])
        dst = ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise ProxyError("bad v1 address") from None
    if src.version != (4 if parts[1] == "TCP4" else 6) or not (
        0 <= sport <= 65535 and 0 <= dport <= 65535
    ):
        raise ProxyError("bad v1 address")
    return ProxyHeader(1, False, (str(src), sport), (str(dst), dport)), end + 2


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | int:
    if len(buf) < 16:
        if not V2_SIGNATURE.startswith(buf[:12]):
            raise ProxyError("bad v2 signature")
        return 16 - len(buf)
    if buf[:12] != V2_SIGNATURE:
        raise ProxyError("bad v2 signature")
    ver_cmd, fam = buf[12], buf[13]
    length: int = struct.unpack("!H", buf[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError("bad v2 version")
    total = 16 + length
    if len(buf) < total:
        return total - len(buf)
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: the proxy itself (health check); ignore addresses
        return ProxyHeader(version=2, local=True), total
    if command != 0x1:
        raise ProxyError("bad v2 command")
    body = buf[16:total]
    family = fam >> 4
    if family == 0x1 and len(body) >= 12:  # AF_INET
        s, d, sp, dp = struct.unpack("!4s4sHH", body[:12])
        return (
            ProxyHeader(2, False, (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp)),
            total,
        )
    if family == 0x2 and len(body) >= 36:  # AF_INET6
        s, d, sp, dp = struct.unpack("!16s16sHH", body[:36])
        return (
            ProxyHeader(2, False, (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp)),
            total,
        )
    if family in (0x0, 0x3):  # UNSPEC or AF_UNIX: no usable address
        return ProxyHeader(version=2, local=True), total
    raise ProxyError("bad v2 address block")


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v2 header; LOCAL when `source` is None (what HAProxy's checks send)."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    fam = 0x11 if src.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body
