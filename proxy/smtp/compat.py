"""Every use of aiosmtpd's private internals, in one place.

aiosmtpd is pinned below its next minor (pyproject.toml: `aiosmtpd>=1.4.6,<1.5`)
because of the things here; tests/test_proxy_codec.py checks the first
against the installed aiosmtpd, and the SMTP tests exercise both on both
event loops. The session (proxy/smtp/session.py) keeps aiosmtpd's verbs
(`smtp_HELO`, `smtp_MAIL`, ... with their syntax checks and replies) and its
public seams: handler hooks (`handle_MAIL`, ...), `_create_envelope`
(documented for subclassing) and `smtp_*` overrides. The connection itself
(reading commands and bodies, the command loop, writing replies) is the
session's own, on a LineBuffer instead of aiosmtpd's StreamReader.

1. `init_session()` stands in for `SMTP.__init__`, which introspects the
   handler and the protocol (inspect.getmembers, dir, signature) on every
   connection and builds a StreamReader and StreamWriter the session does
   not use: it sets the attributes aiosmtpd's verbs read, from tables built
   once per server.
2. `TLSSetupException` and `BOGUS_LIMIT` are aiosmtpd's names the command
   loop needs to behave as aiosmtpd's did.
"""

from __future__ import annotations

import asyncio
import collections
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


IDENT = "ESMTP triaged"  # after the hostname in the greeting


def _command_size_limit() -> int:
    return SMTP.command_size_limit


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
    proto.__ident__ = IDENT
    proto.loop = loop
    proto.event_handler = handler
    proto.data_size_limit = data_size_limit
    proto.enable_SMTPUTF8 = True
    proto._decode_data = False
    proto.command_size_limits = collections.defaultdict(_command_size_limit)
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


# aiosmtpd's names the session's command loop uses.
TLSSetupException = aiosmtpd_smtp.TLSSetupException
BOGUS_LIMIT: int = aiosmtpd_smtp.BOGUS_LIMIT
