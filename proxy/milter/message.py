"""One message as the MTA hands it to a milter, rebuilt as RFC 5322 bytes.

Headers arrive one per SMFIC_HEADER (name, value), the body in chunks with
CRLF line ends (the milter protocol's canonical form). Everything held counts
against the server-wide in-flight byte budget the SMTP front end also uses
(server.max_inflight_data_bytes): past it, or past max_message_bytes, the
message is refused at its end and nothing more is held, but the rest of it is
still read so the protocol stays in step.
"""

from __future__ import annotations

from typing import Protocol

from proxy import verdict as V


class Budget(Protocol):
    """Bytes held across all connections (RelayContext.reserve/unreserve)."""

    inflight_bytes: int

    def reserve(self, n: int) -> bool: ...

    def unreserve(self, n: int) -> None: ...


class MessageBuilder:
    def __init__(self, budget: Budget, max_bytes: int, *, leading_space: bool) -> None:
        self._budget = budget
        self._max_bytes = max_bytes
        self.leading_space = leading_space
        self.macros: dict[str, str] = {}
        self.sender = ""
        self.recipients: list[str] = []
        self.headers: list[tuple[bytes, bytes]] = []  # as the MTA sent them
        self._body: list[bytes] = []
        self.size = 0  # bytes seen, held or not
        self.reserved = 0
        self.refusal: str | None = None  # a reply for the end of the message
        self.active = False  # between the first step of a message and its end

    def _hold(self, n: int) -> bool:
        self.size += n
        if self.refusal is not None:
            return False
        if self.size > self._max_bytes:
            self.refusal = V.MESSAGE_TOO_BIG
        elif not self._budget.reserve(n):
            self.refusal = V.INSUFFICIENT_MEMORY
        else:
            self.reserved += n
            return True
        self._drop()
        return False

    def add_header(self, name: bytes, value: bytes) -> None:
        self.active = True
        if self._hold(len(name) + len(value) + 4):
            self.headers.append((name, value))

    def add_body(self, chunk: bytes) -> None:
        self.active = True
        if chunk and self._hold(len(chunk)):
            self._body.append(chunk)

    def header_block(self) -> bytes:
        sep = b":" if self.leading_space else b": "
        lines = []
        for name, value in self.headers:
            # Folded values come with bare LF (Postfix) or CRLF (Sendmail).
            if b"\n" in value:
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            lines.append(name + sep + value + b"\r\n")
        return b"".join(lines)

    def raw(self) -> bytes:
        return self.header_block() + b"\r\n" + b"".join(self._body)

    def body_bytes(self) -> int:
        return sum(len(b) for b in self._body)

    def message_id(self) -> str:
        for name, value in self.headers:
            if name.strip().lower() == b"message-id":
                return value.strip().decode("ascii", "replace")
        return ""

    def _drop(self) -> None:
        self.headers.clear()
        self._body.clear()
        self._budget.unreserve(self.reserved)
        self.reserved = 0

    def reset(self) -> None:
        """End of message or abort: give the bytes back, start clean."""
        self._drop()
        self.macros = {}
        self.sender = ""
        self.recipients = []
        self.size = 0
        self.refusal = None
        self.active = False
