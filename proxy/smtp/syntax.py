"""What a client may send us, checked before anything reaches the next hop.

- DATA line endings (RFC 5321 2.3.8: lines end in CRLF; a bare CR or LF is
  not allowed). Only CRLF "." CRLF ends DATA here, but a lenient next hop
  may also end it at LF "." LF or LF "." CRLF: relayed unchanged, such a
  sequence lets a sender smuggle a second message past us (the 2023 "SMTP
  smuggling" class, Postfix smtp-smuggling.html). `server.bare_lf` says what
  to do: "reject" (the default, like Postfix `smtpd_forbid_bare_newline =
  strict` and KumoMTA's `invalid_line_endings = "Deny"`) or "normalize"
  (every bare CR or LF becomes CRLF before the message goes on, like
  Postfix's `normal`).
- Control characters in envelope addresses and XFORWARD values: a quoted
  local part may hold a CR (RFC 5321 4.1.2 qtextSMTP excludes it, but
  parsers accept it), which would end a command line at the next hop or a
  header line in a Maildir `Return-Path:`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# XFORWARD values are xtext-ish: printable US-ASCII, no spaces (XFORWARD_README).
_XFORWARD_VALUE = re.compile(r"[!-~]*")


def has_bare_line_ending(raw: bytes) -> bool:
    """True when `raw` holds a CR or LF that is not part of a CRLF pair."""
    crlf = raw.count(b"\r\n")
    return raw.count(b"\n") != crlf or raw.count(b"\r") != crlf


def normalize_line_endings(raw: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF."""
    return _ANY_EOL.sub(b"\r\n", raw)


def message_from_stream(parts: Sequence[bytes]) -> bytes:
    """The dot-stuffed message in the DATA stream read as `parts` (joined:
    the CRLF TriageSMTP._read_body puts in front, the message, "." CRLF): their
    join less those. One copy however many parts: the ends are cut from
    views of the first and last part (joining, then slicing, copied a large
    message twice). The last part holds the whole end marker (LineBuffer.until)."""
    if len(parts) == 1:
        return parts[0][2:-3]
    if len(parts[0]) < 2 or len(parts[-1]) < 3:  # not what read_data hands out
        return b"".join(parts)[2:-3]
    return b"".join([memoryview(parts[0])[2:], *parts[1:-1], memoryview(parts[-1])[:-3]])


def unstuff(message: bytes) -> bytes:
    """Dot-unstuffing (RFC 5321 4.5.2) of `message_from_stream`'s result:
    a line that starts with ".." loses the first "." (the first line too)."""
    if b"\r\n.." in message:
        message = message.replace(b"\r\n..", b"\r\n.")
    if message[:2] == b"..":
        message = message[1:]
    return message


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


def valid_xforward_value(value: str) -> bool:
    return _XFORWARD_VALUE.fullmatch(value) is not None
