"""Every use of aiosmtpd's and asyncio's private internals, in one place.

aiosmtpd is pinned below its next minor (pyproject.toml: `aiosmtpd>=1.4.6,<1.5`)
because of the things here; tests/test_proxy_codec.py checks the first
against the installed aiosmtpd, tests/test_session_safety.py and the SMTP
tests exercise the second on both event loops. Everything else in the
session uses aiosmtpd's public seams: handler hooks (`handle_MAIL`, ...),
`_create_envelope` (documented for subclassing) and `smtp_*` overrides.

1. `init_session()` stands in for `SMTP.__init__`, which introspects the
   handler and the protocol (inspect.getmembers, dir, signature) on every
   connection: about 160 us, a fifth of the relay's CPU per message. It sets
   the same attributes from tables built once per server.
2. `read_data()` reads a DATA body in large chunks: aiosmtpd's own DATA
   reads line by line under a 1001-byte line limit, which would refuse the
   long lines a relay must pass byte for byte, and costs a call per line.
   That needs the StreamReader's buffer limit raised for the duration, and a
   CRLF put in front of the buffered bytes so the end marker is always
   CRLF "." CRLF (also for an empty message).
3. `sanitized_log` is replaced by one that asks the logger's level first
   (see below); what it logs when the level is on is unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP


# command -> method name of every smtp_* verb of `cls`; AUTH is not offered.
def smtp_commands(cls: type[SMTP]) -> dict[str, str]:
    return {m[5:]: m for m in dir(cls) if m.startswith("smtp_") and m != "smtp_AUTH"}


class SmtpMethods(Mapping[str, Callable[..., Any]]):
    """`SMTP._smtp_methods` (command -> bound method), bound when looked up.

    aiosmtpd builds that dict per connection: a bound method for each of ~20
    verbs, of which a session uses five or six (1-2% of the CPU per message).
    aiosmtpd only calls `get()` (the command loop) and `items()` (HELP).
    """

    __slots__ = ("_proto", "_table")

    def __init__(self, proto: SMTP, table: Mapping[str, str]) -> None:
        self._proto = proto
        self._table = table

    def get(self, name: str, default: Any = None) -> Any:
        attr = self._table.get(name)
        return default if attr is None else getattr(self._proto, attr)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        method: Callable[..., Any] = getattr(self._proto, self._table[name])
        return method

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def init_session(
    proto: SMTP,
    *,
    handler: Any,
    hooks: Mapping[str, Callable[..., Any]],
    commands: Mapping[str, str],
    hostname: str,
    data_size_limit: int,
    tls_context: Any,
    timeout_s: float,
) -> None:
    """What `SMTP.__init__(handler, ...)` sets, without the introspection."""
    loop = asyncio.get_running_loop()
    proto.__ident__ = "ESMTP triaged"
    proto.loop = loop
    asyncio.StreamReaderProtocol.__init__(
        proto,
        asyncio.StreamReader(loop=loop, limit=proto.line_length_limit),
        client_connected_cb=proto._cb_client_connected,
        loop=loop,
    )
    proto.event_handler = handler
    proto.data_size_limit = data_size_limit
    proto.enable_SMTPUTF8 = True
    proto._decode_data = False
    proto.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
    proto.hostname = hostname
    proto.tls_context = tls_context
    proto.require_starttls = False
    proto._timeout_duration = timeout_s
    proto._timeout_handle = None
    proto._tls_handshake_okay = True
    proto._tls_protocol = None
    proto._original_transport = None
    proto.session = None
    proto.envelope = None
    proto.transport = None
    proto._handler_coroutine = None
    proto._auth_require_tls = True
    proto._proxy_timeout = None  # PROXY is parsed by proxy/proxyproto.py
    proto._authenticator = None
    proto._auth_callback = None
    proto._auth_required = False
    proto._auth_methods = {}  # no AUTH: a relay for trusted MTAs
    proto._handle_hooks = hooks  # type: ignore[assignment]  # read-only in aiosmtpd: shared
    proto._ehlo_hook_ver = "new"
    proto._smtp_methods = SmtpMethods(proto, commands)  # type: ignore[assignment]
    proto._enforce_call_limit = False


_END = b"\r\n.\r\n"


# 3. aiosmtpd's command loop logs every command line through
#    `sanitized_log(log.debug|log.info, ...)`, which builds a list of the
#    arguments and runs a regex over the line (to mask AUTH secrets) before
#    the logger looks at its level. "mail.log" is at WARNING in production
#    (proxy/logs.py), so that work is thrown away twice per command. The
#    replacement asks the logger first and otherwise calls the original.
_original_sanitized_log = aiosmtpd_smtp.sanitized_log


def _level_first_sanitized_log(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _original_sanitized_log(func, msg, *args, **kwargs)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
aiosmtpd_smtp.sanitized_log = _level_first_sanitized_log


async def read_data(
    reader: asyncio.StreamReader, chunk_bytes: int, on_chunk: Callable[[bytes], None]
) -> None:
    """Hand `on_chunk` the raw DATA stream in pieces of up to `chunk_bytes`:
    a CRLF we put in front, then the client's bytes up to and including the
    first CRLF "." CRLF (RFC 5321 4.1.1.4). Bytes after it stay in the
    reader for the command loop."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    buffer[0:0] = b"\r\n"
    old_limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = chunk_bytes  # type: ignore[attr-defined]
    try:
        while True:
            try:
                chunk = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as exc:
                # No end marker within chunk_bytes: take what is certainly body.
                on_chunk(await reader.readexactly(exc.consumed))
                continue
            on_chunk(chunk)
            return
    finally:
        reader._limit = old_limit  # type: ignore[attr-defined]
