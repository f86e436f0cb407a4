"""A minimal MTA side of the milter protocol for tests: every byte is what the
test says (the codec under test is not used to build them)."""

from __future__ import annotations

import asyncio
import struct

ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


class MilterClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = 0

    @classmethod
    async def connect(cls, address: tuple[str, int] | str) -> MilterClient:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def read_packet(self, wait_s: float = 10.0) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(5), wait_s)
        (length,) = struct.unpack("!I", head[:4])
        data = await asyncio.wait_for(self.reader.readexactly(length - 1), wait_s)
        return head[4:5], data

    async def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> tuple[int, int, bytes]:
        self.writer.write(pkt(b"O", struct.pack("!III", 6, actions, protocol)))
        code, data = await self.read_packet()
        assert code == b"O", (code, data)
        _, acts, self.protocol = struct.unpack_from("!III", data)
        return acts, self.protocol, data[12:]

    async def message(
        self,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        sender: bytes = b"<alice@example.test>",
        rcpts: tuple[bytes, ...] = (b"<bob@example.test>",),
        queue_id: bytes = b"QID1",
        client_addr: bytes = b"192.0.2.7",
        chunk: int = 65535,
    ) -> list[tuple[bytes, bytes]]:
        """Send one message the way Postfix does (NR steps: no answers read
        until the end of message); the packets of the final answer."""
        w = self.writer
        w.write(pkt(b"D", b"M" + z(b"{client_addr}", client_addr, b"{auth_authen}", b"")))
        w.write(pkt(b"M", z(sender)))
        for r in rcpts:
            w.write(pkt(b"R", z(r)))
        for name, value in headers:
            w.write(pkt(b"L", z(name, value)))
        for i in range(0, len(body), chunk):
            w.write(pkt(b"B", body[i : i + chunk]))
        w.write(pkt(b"D", b"E" + z(b"i", queue_id)))
        w.write(pkt(b"E"))
        await w.drain()
        out = []
        while True:
            code, data = await self.read_packet()
            out.append((code, data))
            if code in b"acrtdy":  # a final reply
                return out

    async def closed(self, wait_s: float = 10.0) -> bool:
        """True when the filter closed the connection (EOF) within `wait_s`."""
        try:
            data = await asyncio.wait_for(self.reader.read(100), wait_s)
        except (ConnectionError, asyncio.IncompleteReadError):
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
